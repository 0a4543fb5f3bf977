"""train/pretrain.py end to end on the CPU: DeepSpeed ranks over gloo, started by the real launcher.

Each run is a `deepspeed --num_gpus N train/pretrain.py` subprocess on the tiny model and a small synthetic store, with
`--log_interval 1` (a metrics line per optimizer step) and `--log_samples` (the dataset indices of every step per
rank). DeepSpeed counts CPU "devices" from LOCAL_SIZE, so it is set to the rank count: the runs really use N ranks.
The default run holds one 2-rank run matched against a single process, one SIGTERM resume and a 3-step single-stream
run; the rest is `-m slow`.
"""
import glob
import importlib.util
import itertools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import pytest
import torch
from torch.utils.data import DataLoader

from vilbert import SingleStreamForPretraining, ViLBERTConfig, ViLBERTForPretraining
from vilbert.data import ResumableSampler, write_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train", "pretrain.py")
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
RUN_TIMEOUT = 600
sys.path.insert(0, os.path.join(ROOT, "train"))
import loop  # noqa: E402  (train/loop.py, the loop pretrain.py and finetune.py share)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "synthetic"
    write_synthetic(path, num_images=96)
    return str(path)


def write_json(path, values):
    with open(path, "w") as f:
        json.dump(values, f)
    return str(path)


def ds_config(tmp_path, stage=2, global_batch=8, micro=4, clipping=1.0, lr=3e-3):
    """train/ds_cpu.json with the test's batch, ZeRO stage, clipping and peak learning rate."""
    with open(os.path.join(ROOT, "train", "ds_cpu.json")) as f:
        config = json.load(f)
    config.update(train_batch_size=global_batch, train_micro_batch_size_per_gpu=micro, gradient_clipping=clipping)
    config["optimizer"]["params"]["lr"] = config["scheduler"]["params"]["warmup_max_lr"] = lr
    config["zero_optimization"] = {"stage": stage}
    return write_json(tmp_path / f"ds_zero{stage}_{global_batch}_{micro}.json", config)


def model_config(tmp_path, dropout):
    """The tiny preset (vocab sized to the shipped tokenizer), with all dropouts set to `dropout`."""
    from vilbert.data import load_tokenizer
    config = ViLBERTConfig.preset("tiny", vocab_size=load_tokenizer().vocab_size).to_dict()
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "v_hidden_dropout_prob",
                "v_attention_probs_dropout_prob"):
        config[key] = dropout
    return write_json(tmp_path / f"tiny_dropout{dropout}.json", config)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ranks, output_dir, *args):
    """Starts `deepspeed --num_gpus ranks train/pretrain.py` in its own session (so a test can signal it all)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", LOCAL_SIZE=str(ranks), OMP_NUM_THREADS="1")
    port = free_port()
    command = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(port), SCRIPT,
               "--output_dir", str(output_dir), "--log_interval", "1", "--log_samples", "--num_workers", "0", *args]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    process.master_port = port
    return process


def run(ranks, output_dir, *args):
    process = launch(ranks, output_dir, *args)
    output, _ = process.communicate(timeout=RUN_TIMEOUT)
    assert process.returncode == 0, output[-5000:]
    # DeepSpeed's CPU all-reduce segments (one per rank, in RAM) are gone once the run ends (loop.py unlinks them).
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{process.master_port}_*")
    return output


def metrics(output_dir):
    """{step: metrics line}; where a resumed run redid steps, its lines (later in the file) win."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def samples(output_dir, ranks):
    """{step: sorted dataset indices of the global batch}, later lines winning as in `metrics`."""
    steps = {}
    for rank in range(ranks):
        per_rank = {}
        with open(os.path.join(output_dir, f"samples_rank{rank}.jsonl")) as f:
            for record in map(json.loads, f):
                per_rank[record["step"]] = record["indices"]
        for step, indices in per_rank.items():
            steps.setdefault(step, []).extend(indices)
    return {step: sorted(indices) for step, indices in steps.items()}


def losses(output_dir, name="loss"):
    lines = metrics(output_dir)
    return [lines[s][name] for s in sorted(lines)]


def assert_no_sample_repeated(steps, num_samples, global_batch):
    """Within each epoch of the sampler, every index at most once. (Skips show as a difference from the uninterrupted
    run's samples.)"""
    per_epoch = num_samples // global_batch
    for first in range(1, max(steps) + 1, per_epoch):
        epoch = [i for s in range(first, min(first + per_epoch, max(steps) + 1)) for i in steps[s]]
        assert len(epoch) == len(set(epoch)), f"a sample repeated in the epoch starting at step {first}"


def wait_for_step(output_dir, step, process, timeout=RUN_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before the signal was sent: " + process.stdout.read()[-3000:]
        try:
            if max(metrics(output_dir), default=0) >= step:
                return
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet / a line half written
            pass
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def rank_pids(process):
    """The training ranks: the grandchildren of the `deepspeed` runner (runner -> launch.py -> ranks)."""
    import psutil
    return [p.pid for p in psutil.Process(process.pid).children(recursive=True) if SCRIPT in " ".join(p.cmdline())]


# ---- the launcher runs: ZeRO stages, matching a single process ------------------------------------------------------
def two_ranks_and_one(directory, store, stage):
    """The same run (fp32, no dropout, clipping 1.0) on 2 ranks x micro 4 and on 1 rank x micro 4 x 2 accumulation
    steps: the same global batches, 2 epochs of the 96 samples (24 steps of 8, counted from --epochs on each world
    size). Returns the common arguments and the two output dirs."""
    common = ["--data", store, "--model", model_config(directory, dropout=0.0), "--epochs", "2",
              "--deepspeed_config", ds_config(directory, stage=stage), "--save_interval", "100"]
    output = run(2, directory / "two", *common)
    assert "running on the CPU with gloo" in output and "2 rank(s)" in output
    run(1, directory / "one", *common)
    return common, directory / "two", directory / "one"


@pytest.fixture(scope="module")
def zero2_runs(tmp_path_factory, store):
    return two_ranks_and_one(tmp_path_factory.mktemp("zero2"), store, stage=2)


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(3, marks=pytest.mark.slow)])
def test_two_ranks_match_one_rank(request, tmp_path, store, stage):
    """Step for step the same losses (rtol 1e-5) and samples; the masked losses fall; the export loads."""
    _, two, one = request.getfixturevalue("zero2_runs") if stage == 2 else two_ranks_and_one(tmp_path, store, stage)
    assert len(losses(two)) == len(losses(one)) == 24
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    for name in ("mlm_loss", "region_loss"):
        curve = losses(two, name)[1:]  # step 1 has a learning rate of 0 (warmup)
        assert sum(curve[-6:]) < sum(curve[:6]), f"{name} did not fall: {curve}"
    assert samples(two, 2) == samples(one, 1)
    assert_no_sample_repeated(samples(two, 2), 96, 8)
    # The export holds the trained weights, consolidated from the shards.
    exported = ViLBERTForPretraining.from_pretrained(two / "final").state_dict()
    assert all(t.numel() > 0 for t in exported.values())


class EpochEcho(torch.utils.data.Dataset):
    """Sample i of epoch e is (e, i)."""
    epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return 10

    def __getitem__(self, index):
        return self.epoch, index


def test_epoch_batches_carry_the_epoch_into_the_loader_workers():
    sampler = ResumableSampler(10, seed=0, rank=0, world_size=1, micro_batch_size=5)
    sampler.load_state_dict({"epoch": 3, "consumed_samples": 5})  # one batch of epoch 3 left
    loader = DataLoader(loop.EpochIndexedDataset(EpochEcho()), batch_sampler=loop.EpochBatches(sampler),
                        collate_fn=loop.IndexedCollator(list), num_workers=2)
    batches = list(itertools.islice(loader, 5))
    assert [epoch for epoch, _, _ in batches] == [3, 4, 4, 5, 5]
    for epoch, indices, samples_ in batches:
        assert samples_ == [(epoch, index) for index in indices]


def test_loader_workers_give_the_same_run_across_epochs(tmp_path, zero2_runs):
    """Worker processes that live through the epoch boundary (step 12: 96 samples, global batch 8) load the same
    samples, masked the same way, as the training process itself: the epoch travels with every index."""
    common, _, one = zero2_runs
    run(1, tmp_path, *common, "--num_workers", "2")
    assert metrics(tmp_path)[13]["epoch"] == 1
    assert samples(tmp_path, 1) == samples(one, 1)
    assert losses(tmp_path) == pytest.approx(losses(one), rel=1e-6)


# ---- the single-stream baseline ------------------------------------------------------------------------------------
def test_single_stream_architecture_trains_and_exports(tmp_path, store):
    output = run(1, tmp_path, "--data", store, "--model", model_config(tmp_path, dropout=0.1), "--max_steps", "3",
                 "--deepspeed_config", ds_config(tmp_path), "--architecture", "single-stream")
    assert "backend torch, single-stream" in output
    for name in ("loss", "mlm_loss", "region_loss", "align_loss"):
        assert all(math.isfinite(x) for x in losses(tmp_path, name)), name
    assert all(metrics(tmp_path)[s]["tflops"] > 0 for s in (1, 2, 3))
    assert all(0 < metrics(tmp_path)[s]["data_wait"] < 1 for s in (1, 2, 3))  # loading in-process: a share > 0
    exported = SingleStreamForPretraining.from_pretrained(tmp_path / "final")
    assert all(math.isfinite(float(t.abs().sum())) for t in exported.state_dict().values())
    with pytest.raises(ValueError, match="does not fit ViLBERTForPretraining"):  # the export really is single-stream
        ViLBERTForPretraining.from_pretrained(tmp_path / "final")


def test_tensorboard_monitor_gets_the_metrics_lines(tmp_path, store):
    """"tensorboard": {"enabled": true} in the JSON: DeepSpeed's monitor writes output_dir/tensorboard, one scalar per
    metrics.jsonl field and log step, at the global sample count."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    config_path = ds_config(tmp_path)
    with open(config_path) as f:
        config = json.load(f)
    config["tensorboard"] = {"enabled": True, "job_name": "pretrain"}
    run(1, tmp_path, "--data", store, "--model", model_config(tmp_path, dropout=0.0), "--max_steps", "3",
        "--deepspeed_config", write_json(tmp_path / "ds_tensorboard.json", config))
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard" / "pretrain"))
    events.Reload()
    for name in ("loss", "align_acc", "mlm_acc", "lr"):
        logged = [(e.step, e.value) for e in events.Scalars(f"Train/{name}")]
        expected = [(r["samples"], r[name]) for _, r in sorted(metrics(tmp_path).items())]
        assert [step for step, _ in logged] == [step for step, _ in expected], name
        assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6), name


# ---- resume --------------------------------------------------------------------------------------------------------
def interrupt_and_resume(directory, common, ranks, sig, at_step):
    """Runs `common` with `sig` sent once step `at_step` is logged, then runs it again (resuming); returns the dir."""
    cut = directory / "cut"
    process = launch(ranks, cut, *common)
    wait_for_step(cut, at_step, process)
    if sig == signal.SIGKILL:
        os.killpg(process.pid, signal.SIGKILL)  # everything, at once, wherever it is
        process.communicate(timeout=60)
    else:
        os.kill(rank_pids(process)[-1], sig)  # one rank only: the others must learn of it and stop at the same step
        output, _ = process.communicate(timeout=RUN_TIMEOUT)
        assert process.returncode == 0, output[-5000:]
        assert "checkpoint saved, rerun to resume" in output
    stopped = max(metrics(cut))
    assert "resumed from" in run(ranks, cut, *common)
    assert stopped < max(metrics(cut)), "the run finished before the signal arrived"
    return cut


@pytest.mark.distributed
def test_the_schedule_is_the_official_one_and_metrics_log_the_lr_each_step_used(tmp_path, store, zero2_runs):
    """Step k runs at iteration k - 1 of the linear warmup and decay (the official LambdaLR schedule): only step 1 at
    lr 0. (DeepSpeed's scheduler alone put steps 1 and 2 at lr 0, and get_lr() after the step is the next step's.)"""
    _, straight, _ = zero2_runs
    peak, total = 3e-3, 24  # ds_config's lr, the runs' steps
    warmup = max(1, round(0.1 * total))
    official = [peak * (i / warmup if i < warmup else max(0.0, (total - i) / (total - warmup))) for i in range(total)]
    assert losses(straight, "lr") == pytest.approx(official, rel=1e-6)
    # What the logged lr says, the weights show: step 2 moves them.
    run(1, tmp_path, "--data", store, "--model", "tiny", "--max_steps", "2", "--save_interval", "1",
        "--deepspeed_config", ds_config(tmp_path))
    weights = [torch.load(tmp_path / f"global_step{s}" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
               for s in (1, 2)]
    assert losses(tmp_path, "lr")[1] > 0
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.distributed
def test_sigterm_then_resume_equals_uninterrupted(tmp_path, zero2_runs):
    common, straight, _ = zero2_runs
    # At step 15 of 24: in the second epoch (96 samples, 8 a step), so the saved position is the epoch's, not the run's.
    cut = interrupt_and_resume(tmp_path, common + ["--keep_last", "2"], ranks=2, sig=signal.SIGTERM, at_step=15)
    assert losses(cut) == pytest.approx(losses(straight), rel=1e-6)
    assert samples(cut, 2) == samples(straight, 2)
    tags = [d for d in os.listdir(cut) if d.startswith("global_step")]
    assert len(tags) == 2 and "global_step24" in tags  # keep_last 2: the SIGTERM checkpoint and the final one


@pytest.mark.distributed
def test_resume_refuses_another_seed_batch_or_world_size_and_no_resume_starts_over(tmp_path, zero2_runs):
    """A checkpoint's position names samples of its seed's order: another --seed must not resume it (samples would
    repeat or be skipped), nor another global batch or rank count. --no_resume then starts over, with the earlier run
    set aside."""
    common, two, one = zero2_runs
    shutil.copytree(one, tmp_path / "out")
    process = launch(1, tmp_path / "out", *common, "--seed", "1")
    output, _ = process.communicate(timeout=RUN_TIMEOUT)
    assert process.returncode != 0
    assert "cannot resume" in output and "seed=0, this sampler 1" in output, output[-3000:]
    # Another train_batch_size (the same micro batch, more accumulation): the step would count other samples.
    config = common.index("--deepspeed_config") + 1
    bigger = common[:config] + [ds_config(tmp_path, global_batch=16, micro=4)] + common[config + 1:]
    process = launch(1, tmp_path / "out", *bigger)
    output, _ = process.communicate(timeout=RUN_TIMEOUT)
    assert process.returncode != 0
    assert "'train_batch_size': 8}, this run has {'world_size': 1, 'train_batch_size': 16}" in output, output[-3000:]
    # The two-rank run's ZeRO shards on one rank: DeepSpeed could not load them, so the loop refuses first.
    shutil.copytree(two, tmp_path / "two")
    process = launch(1, tmp_path / "two", *common)
    output, _ = process.communicate(timeout=RUN_TIMEOUT)
    assert process.returncode != 0
    assert "global_step24 was saved by 2 ranks, this run has 1" in output, output[-3000:]
    run(1, tmp_path / "out", *common, "--max_steps", "2", "--seed", "1", "--no_resume")  # (overrides --epochs)
    assert max(metrics(tmp_path / "out")) == 2
    with open(tmp_path / "out" / "latest") as f:
        assert f.read() == "global_step2"
    (previous,) = glob.glob(str(tmp_path / "out" / "previous_runs" / "*"))
    assert "global_step24" in os.listdir(previous) and max(metrics(previous)) == 24


@pytest.mark.distributed
def test_hard_kill_then_resume_equals_uninterrupted(tmp_path, store):
    """With dropout on, so the restored RNG states matter; killed between the checkpoints of steps 5 and 10."""
    common = ["--data", store, "--model", model_config(tmp_path, dropout=0.1), "--max_steps", "20",
              "--deepspeed_config", ds_config(tmp_path), "--save_interval", "5"]
    run(2, tmp_path / "straight", *common)
    cut = interrupt_and_resume(tmp_path, common, ranks=2, sig=signal.SIGKILL, at_step=7)
    assert losses(cut) == pytest.approx(losses(tmp_path / "straight"), rel=1e-6)
    assert samples(cut, 2) == samples(tmp_path / "straight", 2)
    assert_no_sample_repeated(samples(cut, 2), 96, 8)


# ---- ZeRO-3 with the Triton kernels (interpreter) and the tied MLM decoder ------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_triton_matches_zero2(tmp_path, store):
    common = ["--data", store, "--model", model_config(tmp_path, dropout=0.0), "--max_steps", "3",
              "--backend", "triton", "--save_interval", "100"]
    run(2, tmp_path / "z2", "--deepspeed_config", ds_config(tmp_path, stage=2), *common)
    run(2, tmp_path / "z3", "--deepspeed_config", ds_config(tmp_path, stage=3), *common)
    assert losses(tmp_path / "z3") == pytest.approx(losses(tmp_path / "z2"), rel=1e-5)
    exported = [ViLBERTForPretraining.from_pretrained(tmp_path / d / "final").state_dict() for d in ("z2", "z3")]
    for key, value in exported[0].items():
        assert exported[1][key].shape == value.shape and exported[1][key].numel() > 0, key


# ---- errors: one line, non-zero exit, before any rank waits on another ----------------------------------------------
@pytest.fixture
def pretrain(monkeypatch):
    """train/pretrain.py imported in-process as rank 0 of a world of one (a test may change WORLD_SIZE), on the CPU."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(free_port()))):
        monkeypatch.setenv(key, value)
    spec = importlib.util.spec_from_file_location("pretrain_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "gpu_available", lambda: False)
    return module


def error_line(pretrain, capsys, *argv):
    status = pretrain.main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    return err[0]


def test_bad_arguments_fail_with_one_line(pretrain, capsys, tmp_path, monkeypatch):
    good = ds_config(tmp_path)
    assert "--data" in error_line(pretrain, capsys, "--deepspeed_config", good, "--data", str(tmp_path / "nope"))
    assert "preset" in error_line(pretrain, capsys, "--deepspeed_config", good, "--model", "vilbert-huge")
    assert "config file does not exist" in error_line(pretrain, capsys, "--deepspeed_config", good, "--model",
                                                      str(tmp_path / "nope.json"))
    small_vocab = write_json(tmp_path / "small_vocab.json",
                             {**ViLBERTConfig.preset("tiny").to_dict(), "vocab_size": 10})
    assert "vocab_size 10 < the tokenizer's" in error_line(pretrain, capsys, "--deepspeed_config", good, "--model",
                                                           small_vocab)
    assert "--init_bert" in error_line(pretrain, capsys, "--deepspeed_config", good, "--init_bert", good)
    assert "--vocab_file" in error_line(pretrain, capsys, "--deepspeed_config", good, "--vocab_file",
                                        str(tmp_path / "vocab.txt"))
    assert "deepspeed_config" in error_line(pretrain, capsys, "--deepspeed_config", str(tmp_path / "nope.json"))
    assert "deepspeed_config is required" in error_line(pretrain, capsys)
    assert "--max_steps" in error_line(pretrain, capsys, "--deepspeed_config", good, "--max_steps", "0")
    assert "--epochs must be > 0" in error_line(pretrain, capsys, "--deepspeed_config", good, "--epochs", "0")
    assert "--seed must be in" in error_line(pretrain, capsys, "--deepspeed_config", good, "--seed", "-1")
    with open(good) as f:
        config = json.load(f)
    fp16 = write_json(tmp_path / "fp16.json", {**config, "fp16": {"enabled": True}})
    assert "fp16 needs a GPU" in error_line(pretrain, capsys, "--deepspeed_config", fp16)
    both = write_json(tmp_path / "both.json", {**config, "fp16": {"enabled": True}, "bf16": {"enabled": True}})
    assert "both enabled" in error_line(pretrain, capsys, "--deepspeed_config", both)
    no_optimizer = write_json(tmp_path / "no_optimizer.json", {k: v for k, v in config.items() if k != "optimizer"})
    assert '"optimizer" block' in error_line(pretrain, capsys, "--deepspeed_config", no_optimizer)
    monkeypatch.setenv("WORLD_SIZE", "3")  # 8 is not a multiple of micro 4 x 3 ranks
    assert "not divisible" in error_line(pretrain, capsys, "--deepspeed_config", good)


@pytest.mark.parametrize("argv, message", [
    (["--log_interval", "0"], "--log_interval must be >= 1, got 0"),
    (["--save_interval", "0"], "--save_interval must be >= 1, got 0"),
    (["--keep_last", "0"], "--keep_last must be >= 1, got 0"),
    (["--num_workers", "-1"], "--num_workers must be >= 0, got -1"),
    (["--seed", str(2**32 - 1)], r"--seed must be in \[0, 2\*\*32 - 1\)"),
])
def test_run_arguments_are_checked(pretrain, argv, message):
    with pytest.raises(loop.UsageError, match=message):
        pretrain.parse_args(["--deepspeed_config", "train/ds_cpu.json", *argv])


@pytest.mark.parametrize("change, on_gpu, message", [
    (dict(train_batch_size=0), False, "train_batch_size must be a positive integer, got 0"),
    (dict(train_batch_size=8.0), False, "train_batch_size must be a positive integer, got 8.0"),
    (dict(train_micro_batch_size_per_gpu=None), False, "train_micro_batch_size_per_gpu must be a positive"),
    (dict(gradient_accumulation_steps=3), False, "gradient_accumulation_steps 3 != train_batch_size / "
                                                 r"\(micro batch x world size\) = 2"),
    (dict(zero_optimization={"stage": 4}), False, "zero_optimization.stage must be 0, 1, 2 or 3, got 4"),
    (dict(zero_optimization={"stage": 0}, bf16={"enabled": True}), True, "bf16 needs zero_optimization.stage"),
    (dict(optimizer={"params": {}}), False, 'needs an "optimizer" block with a "type"'),
])
def test_deepspeed_config_is_checked(tmp_path, change, on_gpu, message):
    with open(ds_config(tmp_path)) as f:
        config = json.load(f)
    path = write_json(tmp_path / "changed.json", {**config, **change})
    with pytest.raises(loop.UsageError, match=message):
        loop.load_ds_config(path, world_size=1, on_gpu=on_gpu)


def test_deepspeed_config_must_be_json(tmp_path):
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(loop.UsageError, match="is not valid JSON"):
        loop.load_ds_config(str(tmp_path / "broken.json"), world_size=1, on_gpu=False)


@pytest.mark.parametrize("script", ["pretrain.py", "finetune.py"])
def test_without_deepspeed_the_scripts_say_which_extra_to_install(script):
    """`pip install -e .` leaves DeepSpeed out (the train extra brings it): one line, not a traceback."""
    hide_deepspeed = ("import runpy, sys\n"
                      "class NoDeepSpeed:\n"
                      "    def find_spec(self, name, path, target=None):\n"
                      "        if name.split('.')[0] == 'deepspeed':\n"
                      "            raise ModuleNotFoundError(\"No module named 'deepspeed'\", name='deepspeed')\n"
                      "sys.meta_path.insert(0, NoDeepSpeed())\n"
                      f"runpy.run_path({os.path.join(ROOT, 'train', script)!r}, run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", hide_deepspeed], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"{script}: error: No module named 'deepspeed'; install the train extra: "
                                     "pip install -e '.[train]'")


@pytest.mark.slow
@pytest.mark.distributed
def test_bad_data_path_through_the_launcher(tmp_path):
    """Every rank finds the error before any collective: one line (from rank 0), exit status 2, no hang."""
    process = launch(2, tmp_path / "out", "--deepspeed_config", ds_config(tmp_path), "--data", str(tmp_path / "nope"))
    output, _ = process.communicate(timeout=RUN_TIMEOUT)
    assert process.returncode == 2
    assert [line for line in output.splitlines() if "error:" in line] == [
        f"pretrain.py: error: --data {str(tmp_path / 'nope')!r} does not exist"]


@pytest.mark.distributed
def test_data_smaller_than_a_micro_batch_per_rank(tmp_path):
    write_synthetic(tmp_path / "six", num_images=6)  # 2 ranks x micro batch 4 = 8 samples per step
    process = launch(2, tmp_path / "out", "--deepspeed_config", ds_config(tmp_path), "--data", str(tmp_path / "six"))
    output, _ = process.communicate(timeout=RUN_TIMEOUT)
    assert process.returncode == 2
    assert [line for line in output.splitlines() if "error:" in line] == [
        f"pretrain.py: error: {tmp_path / 'six'} has 6 samples, fewer than one micro batch per rank (4 x 2 ranks)"]


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """`latest` moves to a new tag only after the save returned everywhere; old tags go only after that."""
    monkeypatch.setattr(loop, "dist", types.SimpleNamespace(
        barrier=lambda: None, get_rank=lambda: 0, get_world_size=lambda: 1,
        all_gather_object=lambda out, obj: out.__setitem__(0, obj)))

    class Engine:  # writes a tag dir the way DeepSpeed does, optionally failing half way
        def __init__(self, fail):
            self.fail = fail

        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            assert not save_latest and "rng" in client_state
            os.makedirs(os.path.join(save_dir, tag))
            if self.fail:
                raise OSError("No space left on device")

    def state():
        with open(tmp_path / "latest") as f:
            return f.read(), sorted(d for d in os.listdir(tmp_path) if d.startswith("global_step"))

    os.makedirs(tmp_path / "global_step1_universal")  # ds_to_universal's output: not one of this loop's tags
    for step in (1, 2, 3):
        loop.save_checkpoint(Engine(fail=False), str(tmp_path), {"step": step}, keep_last=2)
    assert state() == ("global_step3", ["global_step1_universal", "global_step2", "global_step3"])
    with pytest.raises(OSError):
        loop.save_checkpoint(Engine(fail=True), str(tmp_path), {"step": 4}, keep_last=2)
    assert state() == ("global_step3", ["global_step1_universal", "global_step2", "global_step3", "global_step4"])


def test_half_precision_needs_a_zero_stage_on_gpus(tmp_path):
    """At stage 0 DeepSpeed saves only the bf16/fp16 model, so the export could not hold the fp32 master weights."""
    with open(os.path.join(ROOT, "train", "ds.json")) as f:
        config = json.load(f)
    config["zero_optimization"] = {"stage": 0}
    path = write_json(tmp_path / "bf16_stage0.json", config)
    with pytest.raises(loop.UsageError, match="bf16 needs zero_optimization.stage >= 1"):
        loop.load_ds_config(path, world_size=1, on_gpu=True)
    loop.load_ds_config(path, world_size=1, on_gpu=False)  # the CPU runs fp32


def test_resume_refuses_a_checkpoint_it_cannot_continue(tmp_path):
    """What DeepSpeed loads but this loop cannot continue from stops the run with one line, before any state is
    restored: a checkpoint without the sampler's position, or one whose load failed."""
    class Engine:  # load_checkpoint as DeepSpeed returns it: (path or None, client_state)
        def __init__(self, load_path, client_state):
            self.result = load_path, client_state

        def load_checkpoint(self, output_dir):
            return self.result

    def resume(engine):
        return loop.resume_latest(engine, str(tmp_path), world_size=1, rank=0, sampler=None, train_batch_size=8)

    assert resume(Engine(None, None)) == 0  # no `latest`: a fresh run, nothing loaded
    (tmp_path / "latest").write_text("global_step4")
    os.makedirs(tmp_path / "global_step4")
    with pytest.raises(SystemExit, match="global_step4 was saved by an earlier version of this loop"):
        resume(Engine(str(tmp_path / "global_step4"), {"step": 4, "rng": [None]}))
    with pytest.raises(RuntimeError, match="could not load the checkpoint named by"):
        resume(Engine(None, {}))


def test_no_resume_sets_the_earlier_run_aside(tmp_path):
    """Nothing of the earlier run is deleted, resumed later, or mixed into this run's checkpoint folders."""
    for name in ("global_step3", "global_step6", "final", "previous_runs"):
        os.makedirs(tmp_path / name)
    for name in ("latest", "metrics.jsonl", "samples_rank0.jsonl", "ds.json"):
        (tmp_path / name).write_text(name)
    moved = loop.set_aside_previous_run(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["ds.json", "previous_runs"]
    assert sorted(os.listdir(moved)) == ["final", "global_step3", "global_step6", "latest", "metrics.jsonl",
                                         "samples_rank0.jsonl"]
    assert os.path.dirname(moved) == str(tmp_path / "previous_runs")
    assert loop.set_aside_previous_run(str(tmp_path)) is None  # nothing left to move


def test_resuming_sets_aside_saves_past_latest(tmp_path):
    """A save cut short leaves a folder numbered past `latest`: the resumed run must neither write into it nor keep it
    among its last checkpoints (pruning would delete a complete one instead)."""
    for name in ("global_step4", "global_step8", "global_step12", "previous_runs"):
        os.makedirs(tmp_path / name)
    (tmp_path / "latest").write_text("global_step8")
    moved = loop.set_aside_unfinished_saves(str(tmp_path))
    assert os.listdir(moved) == ["global_step12"] and os.path.dirname(moved) == str(tmp_path / "previous_runs")
    assert sorted(os.listdir(tmp_path)) == ["global_step4", "global_step8", "latest", "previous_runs"]
    assert loop.set_aside_unfinished_saves(str(tmp_path)) is None
    (tmp_path / "latest").write_text("")  # unreadable: resume_latest reports it, nothing is moved
    assert loop.set_aside_unfinished_saves(str(tmp_path)) is None
    os.remove(tmp_path / "latest")  # a first save cut short: no `latest` yet, nothing of it is complete
    moved = loop.set_aside_unfinished_saves(str(tmp_path))
    assert sorted(os.listdir(moved)) == ["global_step4", "global_step8"]


def test_cpu_turns_bf16_off_and_fills_the_schedule():
    with open(os.path.join(ROOT, "train", "ds.json")) as f:
        gpu = json.load(f)
    config, note = loop.load_ds_config(os.path.join(ROOT, "train", "ds.json"), world_size=8, on_gpu=False)
    assert not config["bf16"]["enabled"] and "bf16" in note and config["optimizer"]["params"]["torch_adam"]
    config, note = loop.load_ds_config(os.path.join(ROOT, "train", "ds.json"), world_size=8, on_gpu=True)
    assert config == gpu
    loop.fill_schedule(config, total_steps=1000)
    assert config["scheduler"]["params"]["total_num_steps"] == 1000
    assert config["scheduler"]["params"]["warmup_num_steps"] == 100
    assert config["scheduler"]["params"]["warmup_type"] == "linear"


def test_weight_decay_spares_biases_and_layer_norms():
    """AdamW's groups as the paper: decay on the matrices (embeddings included), none on biases and LayerNorm
    parameters (also the co-layers' LayerNorm1/2 weights, which the official code's name match decays); every
    parameter in one group exactly once (the tied MLM decoder is the word embeddings)."""
    from vilbert.model import LayerNorm
    model = ViLBERTForPretraining(ViLBERTConfig.preset("tiny"))
    decay, no_decay = loop.param_groups(model, weight_decay=0.01)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)
    names = {id(p): name for name, p in model.named_parameters()}
    norms = {names[id(p)] for m in model.modules() if isinstance(m, LayerNorm) for p in m.parameters()}
    spared = sorted(names[id(p)] for p in no_decay["params"])
    assert spared == sorted(name for name in names.values() if name.endswith("bias") or name in norms)
    grouped = [id(p) for p in decay["params"] + no_decay["params"]]
    assert sorted(grouped) == sorted(names) and len(grouped) == len(set(grouped))


def test_loader_workers_default_to_zero_on_the_cpu_and_to_the_free_cores_with_a_gpu(pretrain, monkeypatch):
    """On the CPU, worker processes would compete with the compute threads for the cores; with GPUs each rank gets
    its share of the cores less one (1 to 8); an explicit value wins."""
    for cores, ranks_here, on_gpu, argv, expected in (
            (2, "1", False, [], 0), (16, "1", True, [], 8), (16, "8", True, [], 1), (4, "1", True, [], 3),
            (64, "2", True, [], 8), (16, "1", False, ["--num_workers", "3"], 3),
            (16, "1", True, ["--num_workers", "0"], 0)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cores)))
        monkeypatch.setenv("LOCAL_SIZE", ranks_here)
        args = pretrain.parse_args(["--deepspeed_config", "train/ds_cpu.json", *argv])
        loop.default_workers(args, on_gpu)
        assert args.num_workers == expected, (cores, ranks_here, on_gpu, argv)


def test_timed_counts_the_wait_for_each_item():
    def slow_items():
        for item in range(3):
            time.sleep(0.02)
            yield item

    waited = [0.0]
    assert list(loop.timed(slow_items(), waited)) == [0, 1, 2]
    assert 0.06 <= waited[0] < 1.0


def test_metrics_window_adds_up_the_ranks_and_averages_their_wait(monkeypatch):
    """Two ranks with the same window: samples and the task's sums add up, the data wait is their mean share of the
    window, and the seconds spent saving (pause) are left out of it."""
    monkeypatch.setattr(loop, "dist", types.SimpleNamespace(all_reduce=lambda t: t.mul_(2)))  # the other rank's twin
    clock = iter([100.0, 104.0, 200.0, 203.0, 206.0, 300.0])
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))  # loop's clock only

    def summarize(sums, micro_steps, seconds):
        return {"sums": sums, "micro_steps": micro_steps}

    window = loop.MetricsWindow()  # starts at 100
    window.add(torch.tensor([2.0, 3.0]), [5.0], samples=4, waited=1.0)
    window.add(torch.tensor([1.0, 1.0]), [3.0], samples=4, waited=0.5)
    assert window.close(summarize, world_size=2) == {  # at 104: 4 s
        "sums": [6.0, 8.0, 16.0], "micro_steps": 4.0, "samples_per_s": 16 / 4, "data_wait": 3.0 / 2 / 4}
    window.add(torch.tensor([0.0, 0.0]), [0.0], samples=4, waited=0.0)  # the next window starts at 200
    window.pause(since=201.0)  # a save from 201 to 203
    assert window.close(summarize, world_size=2)["samples_per_s"] == 8 / 4  # at 206: 6 s, 2 of them saving
