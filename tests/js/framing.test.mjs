// Packet framing: the page must split the server's byte stream into packets exactly as the server does.
import assert from "node:assert/strict";
import { test } from "node:test";
import { MAX_PACKET_BYTES, PacketParser, packPacket } from "../../static/framing.js";

const bytes = (...xs) => Uint8Array.from(xs);
const packet = (n, fill = 7) => new Uint8Array(n).fill(fill);
const concat = (...parts) => {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
};

test("packPacket writes a little-endian length before the packet", () => {
  assert.deepEqual(packPacket(bytes(1, 2, 3)), bytes(3, 0, 1, 2, 3));
  const big = packPacket(packet(300));
  assert.deepEqual([big[0], big[1]], [300 & 0xff, 300 >> 8]);
  assert.equal(big.length, 302);
});

test("packPacket refuses empty and oversized packets", () => {
  assert.throws(() => packPacket(new Uint8Array(0)), RangeError);
  assert.throws(() => packPacket(packet(MAX_PACKET_BYTES + 1)), RangeError);
  assert.equal(packPacket(packet(MAX_PACKET_BYTES)).length, MAX_PACKET_BYTES + 2);
});

test("several packets in one frame come out in order", () => {
  const parser = new PacketParser();
  const { packets, errors } = parser.feed(concat(packPacket(bytes(1)), packPacket(bytes(2, 2)), packPacket(bytes(3, 3, 3))));
  assert.deepEqual(packets, [bytes(1), bytes(2, 2), bytes(3, 3, 3)]);
  assert.deepEqual(errors, []);
  assert.equal(parser.pendingBytes, 0);
});

test("a packet split across frames at every possible point is reassembled", () => {
  const stream = concat(packPacket(packet(5, 1)), packPacket(packet(300, 2)), packPacket(packet(1, 3)));
  for (let cut = 0; cut <= stream.length; cut++) {
    const parser = new PacketParser();
    const got = [...parser.feed(stream.slice(0, cut)).packets, ...parser.feed(stream.slice(cut)).packets];
    assert.deepEqual(got, [packet(5, 1), packet(300, 2), packet(1, 3)], `cut at ${cut}`);
  }
});

test("a stream fed one byte per frame still parses", () => {
  const stream = concat(packPacket(packet(40, 9)), packPacket(packet(2, 8)));
  const parser = new PacketParser();
  const got = [];
  for (const b of stream) got.push(...parser.feed(bytes(b)).packets);
  assert.deepEqual(got, [packet(40, 9), packet(2, 8)]);
});

test("packets returned are copies, safe to keep after the frame is reused", () => {
  const frame = packPacket(bytes(4, 5));
  const [p] = new PacketParser().feed(frame).packets;
  frame.fill(0);
  assert.deepEqual(p, bytes(4, 5));
});

test("a zero length drops the rest of the frame; the next frame parses again", () => {
  const parser = new PacketParser();
  const first = parser.feed(concat(packPacket(bytes(1)), bytes(0, 0), packPacket(bytes(2))));
  assert.deepEqual(first.packets, [bytes(1)]);
  assert.equal(first.errors.length, 1);
  assert.match(first.errors[0], /bad packet length 0/);
  assert.deepEqual(parser.feed(packPacket(bytes(6))).packets, [bytes(6)]);
});

test("a length over 1275 is an error, also when the header itself is split", () => {
  const tooLong = MAX_PACKET_BYTES + 1;
  const parser = new PacketParser();
  assert.match(parser.feed(bytes(tooLong & 0xff, tooLong >> 8, 1, 2)).errors[0], /bad packet length 1276/);
  // Header split: one byte now, the other in the next frame.
  const split = new PacketParser();
  assert.deepEqual(split.feed(bytes(tooLong & 0xff)).errors, []);
  const { packets, errors } = split.feed(bytes(tooLong >> 8, 9, 9));
  assert.deepEqual(packets, []);
  assert.equal(errors.length, 1);
  assert.equal(split.pendingBytes, 0);
});

test("four bad frames in a row break the stream; a reset makes it usable again", () => {
  const parser = new PacketParser();
  for (let i = 0; i < 3; i++) parser.feed(bytes(0, 0, 1));
  assert.equal(parser.broken, false);
  const fourth = parser.feed(bytes(0, 0, 1));
  assert.equal(parser.broken, true);
  assert.match(fourth.errors.at(-1), /not Opus packets/);
  assert.deepEqual(parser.feed(packPacket(bytes(1))).packets, []);
  parser.reset();
  assert.deepEqual(parser.feed(packPacket(bytes(1))).packets, [bytes(1)]);
});

test("a good packet between bad frames restarts the streak", () => {
  const parser = new PacketParser();
  for (let i = 0; i < 3; i++) parser.feed(bytes(0, 0));
  parser.feed(concat(packPacket(bytes(1)), bytes(0, 0))); // good then bad: streak back to 1
  parser.feed(bytes(0, 0));
  parser.feed(bytes(0, 0));
  assert.equal(parser.broken, false);
  parser.feed(bytes(0, 0));
  assert.equal(parser.broken, true);
});

test("a trailing partial packet waits for the next frame", () => {
  const parser = new PacketParser();
  const stream = packPacket(packet(10));
  assert.deepEqual(parser.feed(stream.slice(0, 6)).packets, []);
  assert.equal(parser.pendingBytes, 6);
  assert.deepEqual(parser.feed(stream.slice(6)).packets, [packet(10)]);
  assert.equal(parser.pendingBytes, 0);
});
