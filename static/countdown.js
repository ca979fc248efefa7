// The queue countdown: the gateway sends a position and an ETA now and then (at least every few seconds);
// between updates the page counts down on its own so the number a person sees keeps moving.

/** Seconds as "m:ss" (rounded up, so "0:00" shows only when the wait is really over). */
export function formatDuration(seconds) {
  const s = Math.max(0, Math.ceil(seconds));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

/** The line shown while queued. */
export function queueText(position, remainingS) {
  const where = position === 1 ? "You are next in line" : `You are number ${position} in line`;
  return remainingS > 0 ? `${where} — about ${formatDuration(remainingS)} to wait` : `${where} — any moment now`;
}

/**
 * Counts down from the last `update(position, etaS)`. Time comes from `now()` (milliseconds) and ticks
 * from `setTimer`/`clearTimer`, so tests can drive it with a fake clock.
 */
export class Countdown {
  constructor({ now = () => performance.now(), setTimer = setInterval, clearTimer = clearInterval } = {}) {
    this.now = now;
    this.setTimer = setTimer;
    this.clearTimer = clearTimer;
    this.position = null;
    this.deadline = null;
    this.timer = null;
  }

  /** A new position and ETA from the server; restarts the countdown from `etaS`. */
  update(position, etaS) {
    if (!Number.isInteger(position) || position < 1 || !Number.isFinite(etaS)) {
      throw new RangeError(`bad queue update: position ${position}, eta_s ${etaS}`);
    }
    this.position = position;
    this.deadline = this.now() + Math.max(0, etaS) * 1000;
  }

  /** Seconds left (never negative); null when not queued. */
  remaining() {
    return this.deadline === null ? null : Math.max(0, (this.deadline - this.now()) / 1000);
  }

  /** The display line; empty when not queued. */
  text() {
    return this.deadline === null ? "" : queueText(this.position, this.remaining());
  }

  /** Call `onTick(text, remaining)` now and every `intervalMs` until `stop()`. */
  start(onTick, intervalMs = 250) {
    this.stopTicking();
    const tick = () => onTick(this.text(), this.remaining());
    tick();
    this.timer = this.setTimer(tick, intervalMs);
  }

  stopTicking() {
    if (this.timer !== null) this.clearTimer(this.timer);
    this.timer = null;
  }

  /** Leave the queue: stop ticking and forget the position. */
  stop() {
    this.stopTicking();
    this.position = null;
    this.deadline = null;
  }
}
