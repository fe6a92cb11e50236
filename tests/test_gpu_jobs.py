"""
What the sampling jobs do on GPUs, shown on a CPU with faked answers: the network
called at one batch shape under --compile and at a smaller one when the device runs
out of memory (:class:`~guided_diffusion.translation.sampling.BatchedModel`), the memory that
--memory auto judges shared among the ranks of a machine, ranks that would resume
a scene from different saved jobs stopped, and a model trained in float16 sampled
under --use_bf16.

The reference facts: the per-image outputs of the plain network (computed here), the
memory numbers chosen in each test, and per-rank answers written in the test.
"""


from dataclasses import replace

import pytest
import torch as th
from conftest import TINY_FLAGS

from guided_diffusion import dist_util
from guided_diffusion.translation.jobs import Sampling, SceneJob
from guided_diffusion.translation.sampling import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


class PerImage(th.nn.Module):
    """A network whose output for an image depends on that image and its t alone."""

    def forward(self, x, t, scale=None):
        out = x * (1 + t.view(-1, 1, 1, 1).float()) - x.mean(
            dim=(1, 2, 3), keepdim=True
        )
        return out if scale is None else out * scale.view(-1, 1, 1, 1)


class Recording(th.nn.Module):
    """The network, recording the batch size of every call."""

    def __init__(self, model, limit=None):
        super().__init__()
        self.model, self.limit, self.sizes = model, limit, []

    def forward(self, x, t, **kwargs):
        self.sizes.append(x.shape[0])
        if self.limit is not None and x.shape[0] > self.limit:
            raise th.OutOfMemoryError(f"CUDA out of memory at a batch of {x.shape[0]}")
        return self.model(x, t, **kwargs)


def batch(n, seed=0):
    g = th.Generator().manual_seed(seed)
    return (
        th.randn(n, 2, 4, 4, generator=g),
        th.arange(n),
        th.rand(n, generator=g) + 0.5,
    )


def test_compiled_calls_are_padded_to_the_batch_and_the_padding_dropped():
    from guided_diffusion.translation.sampling import BatchedModel

    net = Recording(PerImage())
    model = BatchedModel(net, 4, pad=True)
    for n in (4, 3, 1):
        x, t, scale = batch(n, seed=n)
        out = model(x, t, scale=scale)
        assert th.allclose(out, PerImage()(x, t, scale=scale), atol=1e-6)
    assert net.sizes == [4, 4, 4]  # one input shape: no recompiling
    plain = Recording(PerImage())
    BatchedModel(plain, 4)(*batch(3)[:2])
    assert plain.sizes == [3]  # without --compile, the batch as it comes


def test_out_of_memory_halves_the_batch_until_it_fits_and_keeps_it(capsys):
    from guided_diffusion.translation.sampling import BatchedModel

    net = Recording(PerImage(), limit=7)
    model = BatchedModel(net, 64)
    x, t, scale = batch(15)
    out = model(x, t, scale=scale)
    assert th.allclose(out, PerImage()(x, t, scale=scale), atol=1e-6)
    assert net.sizes == [15, 7, 7, 1]  # 15 fails, then 7 + 7 + 1
    assert model.batch_size == 7 and model.shrunk == [(15, 7)]
    logged = capsys.readouterr().out
    assert "out of memory at 15 images per network call: 7 from now on" in logged
    net.sizes.clear()
    model(x, t, scale=scale)  # the next call starts at the size that fit
    assert net.sizes == [7, 7, 1]
    # a single image that does not fit: nothing smaller to try
    with pytest.raises(th.OutOfMemoryError):
        BatchedModel(Recording(PerImage(), limit=0), 8)(*batch(3)[:2])


def test_out_of_memory_under_compile_pads_to_the_smaller_batch():
    from guided_diffusion.translation.sampling import BatchedModel

    net = Recording(PerImage(), limit=4)
    model = BatchedModel(net, 8, pad=True)
    x, t, _ = batch(5)
    assert th.allclose(model(x, t), PerImage()(x, t), atol=1e-6)
    assert net.sizes == [8, 4, 4]  # 5 padded to 8 fails; 4 + (1 padded to 4)


def test_memory_auto_shares_the_judged_memory_among_the_ranks_of_a_machine():
    from guided_diffusion.translation.scene_translation import (
        MEMORY_SHARE,
        arrays_on_disk,
    )

    gib = 2**30
    assert MEMORY_SHARE == 0.5  # the numbers below are chosen for it
    # 3 GiB of arrays, 10 GiB available: one rank keeps them in memory (3 <= 5),
    # two ranks of one machine would take 6 of the 5 judged safe
    assert not arrays_on_disk("auto", 3 * gib, 10 * gib, ranks_here=1)
    assert arrays_on_disk("auto", 3 * gib, 10 * gib, ranks_here=2)
    assert not arrays_on_disk("auto", 2 * gib, 10 * gib, ranks_here=2)
    assert arrays_on_disk("mmap", 1, 10 * gib, ranks_here=1)
    assert not arrays_on_disk("ram", 9 * gib, gib, ranks_here=8)


def test_the_ranks_of_this_machine_are_counted_by_host_name(monkeypatch):
    from guided_diffusion.translation.scene_translation import ranks_on_this_machine

    assert ranks_on_this_machine() == 1  # one process
    monkeypatch.setattr(
        dist_util, "all_gather_object", lambda mine: [mine, "node-b", mine, "node-c"]
    )
    assert ranks_on_this_machine() == 2


def test_ranks_that_would_resume_different_saved_jobs_are_stopped(tmp_path):
    from guided_diffusion.translation.scene import JobMismatch
    from guided_diffusion.translation.scene_translation import check_saved_jobs_agree

    folder = str(tmp_path / "out.tif.work")
    saved = (4, "0f3c")  # rank 0 reads a job saved at step 4
    assert check_saved_jobs_agree([saved, saved, saved], folder) == 4
    assert check_saved_jobs_agree([None, None], folder) is None
    for other in (None, (2, "77aa"), (4, "77aa")):
        with pytest.raises(JobMismatch) as err:
            check_saved_jobs_agree([saved, other, saved], folder)
        message = str(err.value)
        assert "\n" not in message and folder in message
        assert "rank 0" in message and "rank 1" in message
        assert "file system" in message and "--work_dir" in message
    # one rank refuses the job it reads (other settings): every rank stops with it
    refused = (
        "refused",
        f"{folder} holds a job saved with other settings (seed 0, not 3)",
    )
    with pytest.raises(JobMismatch, match="seed 0, not 3"):
        check_saved_jobs_agree([refused, refused], folder)


def test_an_fp16_model_asked_for_bf16_runs_in_bfloat16_on_float32_weights(
    tiny_checkpoint, capsys
):
    flags = {**TINY_FLAGS, "use_fp16": True}
    # "meta" stands in for a GPU: a device that is not the CPU, with no arithmetic
    model = load_model(tiny_checkpoint, flags, "meta")
    assert model.dtype == th.float16  # trained in float16: a GPU runs it so
    capsys.readouterr()
    model = load_model(tiny_checkpoint, flags, "meta", use_bf16=True)
    assert model.dtype == th.float32
    assert {p.dtype for p in model.parameters()} == {th.float32}
    lines = [x for x in capsys.readouterr().out.splitlines() if "use_fp16" in x]
    assert len(lines) == 1 and "--use_bf16 True" in lines[0] and "bfloat16" in lines[0]


def test_use_fp16_and_use_bf16_given_together_are_refused(tiny_checkpoint):
    flags = {"model_path": str(tiny_checkpoint), "use_fp16": True, "use_bf16": True}
    with pytest.raises(ValueError) as err:
        Sampling.from_flags(flags)
    assert "--use_fp16 True" in str(err.value) and "--use_bf16 True" in str(err.value)
    assert "\n" not in str(err.value)
    # the model's own use_fp16 (its config.json) with --use_bf16: accepted
    flags["use_fp16"] = None  # not given
    assert Sampling.from_flags(flags).use_bf16


def test_the_precisions_a_job_runs_in_are_part_of_its_key(tmp_path, monkeypatch):
    from guided_diffusion.translation.scene_translation import job_key

    scene = tmp_path / "scene.tif"
    scene.write_bytes(b"a scene")
    model = tmp_path / "model.pt"
    model.write_bytes(b"a model")
    job = SceneJob(input=str(scene), output="o.tif", model_path=str(model), use_tf32=True)
    flags = {**TINY_FLAGS, "use_fp16": True}
    on_cpu = job_key(job, 32, 16, flags)
    # a CPU runs float16 models in float32, and TF32 is a CUDA mode
    assert "use_fp16" not in on_cpu and "use_tf32" not in on_cpu
    monkeypatch.setattr(dist_util, "dev", lambda: th.device("cuda", 0))
    on_gpu = job_key(job, 32, 16, flags)
    assert on_gpu["use_fp16"] is True and on_gpu["use_tf32"] is True
    # bfloat16 autocast on the float32 weights instead
    assert "use_fp16" not in job_key(replace(job, use_bf16=True), 32, 16, flags)
