// The queue countdown: counts down between server updates, restarts on each update, never goes negative.
import assert from "node:assert/strict";
import { test } from "node:test";
import { Countdown, formatDuration, queueText } from "../../static/countdown.js";

// A fake clock and timer: ticks happen only when the test advances time.
function fakeTime() {
  const clock = { now: 0, timers: new Map(), next: 1 };
  clock.setTimer = (fn, ms) => {
    clock.timers.set(clock.next, { fn, ms, due: clock.now + ms });
    return clock.next++;
  };
  clock.clearTimer = (id) => clock.timers.delete(id);
  clock.advance = (ms) => {
    const end = clock.now + ms;
    for (;;) {
      const due = [...clock.timers.values()].filter((t) => t.due <= end).sort((a, b) => a.due - b.due)[0];
      if (!due) break;
      clock.now = due.due;
      due.due += due.ms;
      due.fn();
    }
    clock.now = end;
  };
  return clock;
}

test("formatDuration rounds up to whole seconds as m:ss", () => {
  assert.equal(formatDuration(0), "0:00");
  assert.equal(formatDuration(0.2), "0:01");
  assert.equal(formatDuration(59), "0:59");
  assert.equal(formatDuration(61.5), "1:02");
  assert.equal(formatDuration(-3), "0:00");
  assert.equal(formatDuration(3600), "60:00");
});

test("queueText names the position and the wait", () => {
  assert.equal(queueText(1, 12), "You are next in line — about 0:12 to wait");
  assert.equal(queueText(3, 75), "You are number 3 in line — about 1:15 to wait");
  assert.equal(queueText(2, 0), "You are number 2 in line — any moment now");
});

test("the countdown goes down with the clock and stops at zero", () => {
  const clock = fakeTime();
  const c = new Countdown({ now: () => clock.now, setTimer: clock.setTimer, clearTimer: clock.clearTimer });
  assert.equal(c.remaining(), null);
  assert.equal(c.text(), "");
  c.update(2, 10);
  assert.equal(c.remaining(), 10);
  clock.advance(4000);
  assert.equal(c.remaining(), 6);
  assert.equal(c.text(), "You are number 2 in line — about 0:06 to wait");
  clock.advance(20000);
  assert.equal(c.remaining(), 0);
  assert.equal(c.text(), "You are number 2 in line — any moment now");
});

test("a server update restarts the countdown from the new ETA and position", () => {
  const clock = fakeTime();
  const c = new Countdown({ now: () => clock.now, setTimer: clock.setTimer, clearTimer: clock.clearTimer });
  c.update(3, 30);
  clock.advance(5000);
  c.update(1, 40); // the ETA may also grow, e.g. when a worker overruns
  assert.equal(c.remaining(), 40);
  assert.equal(c.position, 1);
});

test("ticking shows a falling display until stopped", () => {
  const clock = fakeTime();
  const c = new Countdown({ now: () => clock.now, setTimer: clock.setTimer, clearTimer: clock.clearTimer });
  const shown = [];
  c.update(1, 3);
  c.start((text, remaining) => shown.push([text, remaining]), 1000);
  clock.advance(3000);
  assert.deepEqual(
    shown.map(([, r]) => r),
    [3, 2, 1, 0],
  );
  assert.equal(shown[0][0], "You are next in line — about 0:03 to wait");
  assert.equal(shown.at(-1)[0], "You are next in line — any moment now");
  c.stop();
  clock.advance(5000);
  assert.equal(shown.length, 4);
  assert.equal(clock.timers.size, 0);
  assert.equal(c.text(), "");
});

test("restarting the ticker does not leave a second timer running", () => {
  const clock = fakeTime();
  const c = new Countdown({ now: () => clock.now, setTimer: clock.setTimer, clearTimer: clock.clearTimer });
  c.update(1, 10);
  c.start(() => {});
  c.update(1, 8);
  c.start(() => {});
  assert.equal(clock.timers.size, 1);
});

test("bad updates are refused", () => {
  const c = new Countdown({ now: () => 0 });
  assert.throws(() => c.update(0, 5), RangeError);
  assert.throws(() => c.update(1.5, 5), RangeError);
  assert.throws(() => c.update(1, Number.NaN), RangeError);
});
