"""benchmarks/concurrent_runs.py on the CPU with a tiny model: the in-process and the processes
modes step every run (streams need CUDA; the GPU runs that mode)."""

import concurrent_runs


def test_serial_steps_every_run_in_turn(tiny_mlm_dir):
    setting = concurrent_runs.Setting(str(tiny_mlm_dir), "cpu", "full", warmup=1, seconds=0.2)
    steps, elapsed = concurrent_runs.in_process(2, "serial", setting)
    assert steps >= 2 and steps % 2 == 0 and elapsed >= 0.2  # whole rounds: a step of each run


def test_processes_start_their_windows_together_and_report_their_steps(tiny_mlm_dir):
    setting = concurrent_runs.Setting(str(tiny_mlm_dir), "cpu", "lora+head", warmup=1, seconds=0.2)
    steps, elapsed = concurrent_runs.processes(2, setting)
    assert steps >= 2 and elapsed >= 0.2


def test_host_profile_names_where_the_window_went(tiny_mlm_dir):
    setting = concurrent_runs.Setting(str(tiny_mlm_dir), "cpu", "full", warmup=1, seconds=0.2)
    text = concurrent_runs.host_profile(2, "serial", setting, top=5)
    assert text.startswith("2 runs, serial, profiled: ") and "Ordered by: internal time" in text
    assert "train.py" in text or "{" in text  # rows of functions, ours or torch's built-ins
