"""When saves fall and what stays: the wall-clock interval, retention, a directory whose
`latest` is gone, explicit load against auto-resume, and runs that would replace complete
checkpoints of another run (refused before anything is built)."""

from __future__ import annotations

import shutil

from megatron_geno.train import SaveClock
from tests.faults.helpers import error_line, train, tree


def test_save_clock_is_due_after_its_minutes_of_a_fake_clock():
    now = [100.0]
    clock = SaveClock(2.0, clock=lambda: now[0])
    assert not clock.due()
    now[0] += 119.0
    assert not clock.due()
    now[0] += 1.0
    assert clock.due()
    clock.saved()
    assert not clock.due()
    now[0] += 120.0
    assert clock.due()
    assert not SaveClock(0.0, clock=lambda: now[0] + 1e9).due()  # 0: off


def _iterations(save):
    return sorted(p.name for p in save.iterdir() if p.name.startswith("iter_"))


def test_time_saves_fire_and_retention_keeps_what_it_must(tmp_path):
    save, run = tmp_path / "ck", tmp_path / "run"
    first = train(run, "schedule.train_iters=2", "checkpoint.save_interval=1",
                  f"checkpoint.save={save}")
    assert first.returncode == 0, first.stderr[-3000:]
    (save / "iter_0000001" / "mine.txt").write_text("not a checkpoint file")
    (save / "notes.txt").write_text("foreign")
    # resumes at 2; a save is due by time at every step (a tiny interval; every rank learns it
    # one step later, so from step 4), keep_last=1
    second = train(run, "schedule.train_iters=6", "checkpoint.save_interval=0",
                   "checkpoint.save_interval_minutes=0.00001", "checkpoint.keep_last=1",
                   f"checkpoint.save={save}", "logging.quiet=false")
    assert second.returncode == 0, second.stderr[-3000:]
    said = second.stdout + second.stderr
    for it in (4, 5, 6):  # fired by time (4, 5), then pruned but the newest
        assert f"saved checkpoint {save / f'iter_{it:07d}'}" in said, said[-3000:]
    # iter_2: the end of the first run's phase (train_iters=2); iter_6: the newest; iter_1 and
    # iter_4/5 pruned, iter_1 kept as a directory for the file that is not ours
    assert _iterations(save) == ["iter_0000001", "iter_0000002", "iter_0000006"]
    assert sorted(p.name for p in (save / "iter_0000001").iterdir()) == ["mine.txt"]
    assert (save / "notes.txt").read_text() == "foreign"
    assert (save / "latest").read_text().strip() == "6"


def test_missing_latest_resumes_from_the_newest_complete_and_never_restarts(tmp_path):
    save, run = tmp_path / "ck", tmp_path / "run"
    first = train(run, "schedule.train_iters=4", "checkpoint.save_interval=2",
                  f"checkpoint.save={save}")
    assert first.returncode == 0, first.stderr[-3000:]
    (save / "latest").unlink()
    (save / "iter_0000004" / "theirs.bin").write_bytes(b"x")
    again = train(run, "schedule.train_iters=6", f"checkpoint.save={save}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "no 'latest' file" in again.stderr and "iter_0000004" in again.stderr
    assert (save / "latest").read_text().strip() == "6"
    assert _iterations(save) == ["iter_0000002", "iter_0000004", "iter_0000006"]
    assert (save / "iter_0000004" / "theirs.bin").read_bytes() == b"x"


def test_runs_that_would_replace_complete_checkpoints_are_refused_and_change_nothing(tmp_path):
    save, run = tmp_path / "ck", tmp_path / "run"
    first = train(run, "schedule.train_iters=4", "checkpoint.save_interval=2",
                  f"checkpoint.save={save}")
    assert first.returncode == 0, first.stderr[-3000:]
    before = tree(save)
    # a fresh start into the same directory (auto-resume off) would overwrite iter_2 and iter_4
    fresh = train(tmp_path / "run2", "schedule.train_iters=4", "checkpoint.auto_resume=false",
                  f"checkpoint.save={save}")
    line = error_line(fresh)
    assert "iter_0000004" in line and "starting at iteration 0" in line, line
    # an explicit full load wins over auto-resume (said), and a rollback into the same
    # directory would replace iter_4: refused
    rollback = train(tmp_path / "run3", "schedule.train_iters=4",
                     f"checkpoint.load={save / 'iter_0000002'}", f"checkpoint.save={save}")
    line = error_line(rollback)
    assert "iter_0000004" in line and "starting at iteration 2" in line, line
    assert "checkpoint.auto_resume would have resumed from" in rollback.stderr
    assert tree(save) == before
    # the same rollback into a new directory goes ahead from iteration 2
    other = tmp_path / "ck2"
    ok = train(tmp_path / "run4", "schedule.train_iters=3",
               f"checkpoint.load={save / 'iter_0000002'}", f"checkpoint.save={other}")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert _iterations(other) == ["iter_0000003"]
    shutil.rmtree(other)


def test_a_different_architecture_is_refused_before_the_model_is_built(tmp_path):
    import subprocess
    import sys

    from tests.functional.launcher import quiet_env

    save = tmp_path / "ck"
    first = train(tmp_path / "run", "schedule.train_iters=2", f"checkpoint.save={save}")
    assert first.returncode == 0, first.stderr[-3000:]
    # genos-1.2b (a 1.2B model: ~20 GB of host memory with its optimizer) against the tiny
    # checkpoint; the child's peak memory is measured from outside (its rusage)
    script = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], "
              "capture_output=True, text=True); sys.stderr.write(p.stderr); "
              "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    cmd = [sys.executable, "-c", script, sys.executable, "-m", "megatron_geno.cli",
           "--preset", "genos-1.2b", "data.seq_length=128", "data.micro_batch_size=1",
           "data.global_batch_size=1", f"logging.run_dir={tmp_path / 'big'}",
           f"checkpoint.load={save}", "logging.tensorboard=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=quiet_env())
    code, peak_kib = map(int, proc.stdout.split())
    assert code == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "model.num_layers" in errors[0], proc.stderr[-3000:]
    assert peak_kib < 2 * 2**20, f"the refused run peaked at {peak_kib / 2**20:.1f} GiB"


def test_a_changed_sequence_length_is_refused_on_resume_unless_the_data_position_resets(
        tmp_path):
    save = tmp_path / "ck"
    first = train(tmp_path / "run", "schedule.train_iters=2", f"checkpoint.save={save}")
    assert first.returncode == 0, first.stderr[-3000:]
    before = tree(save)
    line = error_line(train(tmp_path / "run", "schedule.train_iters=4", "data.seq_length=64",
                            f"checkpoint.save={save}"))
    assert "data.seq_length=128" in line and "data.seq_length=64" in line, line
    assert "checkpoint.reset_data_position=true" in line
    assert tree(save) == before
    ok = train(tmp_path / "run", "schedule.train_iters=4", "data.seq_length=64",
               "checkpoint.reset_data_position=true", f"checkpoint.save={save}")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "the data starts from its beginning (the checkpoint had consumed 16 samples)" \
        in ok.stderr
    assert (save / "latest").read_text().strip() == "4"
