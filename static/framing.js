// The wire packet stream `[uint16 little-endian length][Opus packet]...` (docs/PROTOCOL.md).
// Same rules as the server's core/audio/framing.py, so both ends agree on what a broken stream is:
// a length of 0 or over 1275 is an error; the rest of that frame is dropped and parsing starts again at
// the next frame; after `maxBadFrames` such frames in a row the stream is broken and ignored.

export const MAX_PACKET_BYTES = 1275; // one 20 ms Opus frame at most (RFC 6716 §3.4)
export const HEADER_BYTES = 2;

/** Length-prefix one packet; throws RangeError for an empty or oversized packet. */
export function packPacket(packet) {
  const n = packet.byteLength;
  if (n === 0 || n > MAX_PACKET_BYTES) {
    throw new RangeError(`packet has ${n} bytes; a packet must have 1..${MAX_PACKET_BYTES}`);
  }
  const out = new Uint8Array(HEADER_BYTES + n);
  out[0] = n & 0xff;
  out[1] = n >> 8;
  out.set(packet instanceof Uint8Array ? packet : new Uint8Array(packet), HEADER_BYTES);
  return out;
}

/** Incremental parser of one packet stream; feed it each binary frame in order. Never throws. */
export class PacketParser {
  constructor({ maxPacketBytes = MAX_PACKET_BYTES, maxBadFrames = 4 } = {}) {
    this.maxPacketBytes = maxPacketBytes;
    this.maxBadFrames = maxBadFrames;
    this.reset();
  }

  /** Forget any partial packet and the error streak (a new stream). */
  reset() {
    // At most one partial packet is ever held, so a fixed buffer of the largest size is enough.
    this.pending = new Uint8Array(HEADER_BYTES + this.maxPacketBytes);
    this.pendingBytes = 0;
    this.badStreak = 0;
    this.broken = false;
    this.errors = 0;
  }

  /**
   * Add one frame; returns `{packets, errors}`: the packets it completes (copies, in order) and a
   * message for each bad length found.
   */
  feed(frame) {
    const data = frame instanceof Uint8Array ? frame : new Uint8Array(frame);
    const packets = [];
    const errors = [];
    if (this.broken) return { packets, errors };
    let pos = this.pendingBytes ? this.#completePending(data, packets, errors) : 0;
    while (data.length - pos >= HEADER_BYTES) {
      const length = data[pos] | (data[pos + 1] << 8);
      if (!this.#lengthOk(length, errors, packets.length > 0)) {
        pos = data.length;
        break;
      }
      const end = pos + HEADER_BYTES + length;
      if (end > data.length) break;
      packets.push(data.slice(pos + HEADER_BYTES, end));
      pos = end;
    }
    if (pos < data.length) {
      this.pending.set(data.subarray(pos), this.pendingBytes);
      this.pendingBytes += data.length - pos;
    }
    if (packets.length && !errors.length) this.badStreak = 0;
    return { packets, errors };
  }

  // Finish the packet left over from earlier frames; returns how many bytes of `data` it used.
  #completePending(data, packets, errors) {
    let pos = 0;
    if (this.pendingBytes < HEADER_BYTES) {
      if (!data.length) return 0;
      this.pending[this.pendingBytes++] = data[pos++];
      if (!this.#lengthOk(this.#pendingLength(), errors, false)) {
        this.pendingBytes = 0;
        return data.length;
      }
    }
    const need = HEADER_BYTES + this.#pendingLength() - this.pendingBytes;
    const take = Math.min(need, data.length - pos);
    this.pending.set(data.subarray(pos, pos + take), this.pendingBytes);
    this.pendingBytes += take;
    if (take === need) {
      packets.push(this.pending.slice(HEADER_BYTES, this.pendingBytes));
      this.pendingBytes = 0;
    }
    return pos + take;
  }

  #pendingLength() {
    return this.pending[0] | (this.pending[1] << 8);
  }

  // A good packet earlier in the same frame restarts the streak: the stream was fine up to here.
  #lengthOk(length, errors, delivered) {
    if (length !== 0 && length <= this.maxPacketBytes) return true;
    this.errors += 1;
    this.badStreak = delivered ? 1 : this.badStreak + 1;
    errors.push(`bad packet length ${length} (must be 1..${this.maxPacketBytes}); rest of the frame dropped`);
    if (this.badStreak >= this.maxBadFrames) {
      this.broken = true;
      errors.push(`${this.badStreak} frames in a row with bad lengths: the stream is not Opus packets`);
    }
    return false;
  }
}
