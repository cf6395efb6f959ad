"""Alert rules, on snapshots built in the test (the rules are pure; GPU readings are given, as NVML would)."""
from __future__ import annotations

from worker.telemetry.alerts import AlertMonitor, GpuReading, Snapshot, Thresholds

THRESHOLDS = Thresholds(gpu_memory_share=0.9, gpu_temperature_c=85, stall_s=60, failure_rate=0.5,
                        failure_window_s=300, failure_min_jobs=4)
GIB = 1024**3


def gpu(index: int, used_gib: float, temperature_c: float = 60) -> GpuReading:
    return GpuReading(index, "H100", f"GPU-{index}", 0.9, int(used_gib * GIB), 80 * GIB, temperature_c, 400.0)


def snap(at_s: float, done: float = 0, failed: float = 0, held: int = 0, steps: float | None = None,
         gpus=()) -> Snapshot:
    return Snapshot(at_s, done, failed, held, steps, tuple(gpus))


def test_gpu_memory_and_temperature_fire_per_gpu_and_end_when_back_under():
    monitor = AlertMonitor(THRESHOLDS)
    started, ended = monitor.update(snap(0, gpus=[gpu(0, 40), gpu(1, 78, temperature_c=91)]))
    assert {a.key for a in started} == {("gpu_memory", "gpu1"), ("gpu_temperature", "gpu1")} and ended == []
    assert "98% used, above 90%" in monitor.firing["gpu_memory", "gpu1"].message
    started, ended = monitor.update(snap(15, gpus=[gpu(0, 40), gpu(1, 78, temperature_c=80)]))
    assert started == [] and [a.key for a in ended] == [("gpu_temperature", "gpu1")]
    assert set(monitor.firing) == {("gpu_memory", "gpu1")}


def test_a_worker_holding_jobs_without_progress_is_stalled_and_an_idle_one_is_not():
    monitor = AlertMonitor(THRESHOLDS)
    assert monitor.update(snap(0, done=3, held=0)) == ([], [])
    assert monitor.update(snap(100, done=3, held=0)) == ([], [])  # idle: nothing held
    assert monitor.update(snap(110, done=3, held=2)) == ([], [])  # the clock runs from the last idle reading
    started, _ = monitor.update(snap(171, done=3, held=2))
    assert [a.key for a in started] == [("stalled", "worker")]
    assert "2 jobs held and no progress for 71 s" in started[0].message
    _, ended = monitor.update(snap(172, done=4, held=2))  # a job ended: progress
    assert [a.key for a in ended] == [("stalled", "worker")]


def test_engine_steps_count_as_progress():
    monitor = AlertMonitor(THRESHOLDS)
    for at_s in range(0, 300, 30):
        assert monitor.update(snap(at_s, held=5, steps=at_s * 10)) == ([], [])


def test_failure_rate_counts_only_the_window_and_waits_for_enough_jobs():
    monitor = AlertMonitor(THRESHOLDS)
    monitor.update(snap(0))
    assert monitor.update(snap(10, failed=3)) == ([], [])  # 3 jobs: fewer than failure_min_jobs
    started, _ = monitor.update(snap(20, done=1, failed=4))
    assert [a.key for a in started] == [("failure_rate", "worker")]
    assert "4 of the 5 jobs ended in the last 300 s failed (80%" in started[0].message
    # Later the failures leave the window (whose start is now the reading at 20 s) and the new jobs succeed
    _, ended = monitor.update(snap(330, done=5, failed=4))
    assert [a.key for a in ended] == [("failure_rate", "worker")]
