"""
The training loop: steps, EMA, checkpoints that survive crashes, resume, logging.

A checkpoint at step S is the files ``model{S:06d}.pt``, ``ema_{rate}_{S:06d}.pt``
and ``opt{S:06d}.pt`` (plain state dicts, loadable by the original code) and
``state{S:06d}.pt`` (everything else resume needs), written in that order, each
atomically. A checkpoint is complete when its state file exists. Their names,
finding and pruning them live in checkpoints.py; ``find_resume_checkpoint`` stays
importable from here, where guided-diffusion's code looks for it.

Training is a function of (seed, global batch) alone: the data order, the
timesteps and the noise of every step are drawn for the whole global batch from
generators seeded by (seed, step), and each rank takes its block. Two ranks at
batch B therefore follow the same trajectory as one process at batch 2B, and a
resumed run the same as an uninterrupted one. Dropout, which draws from the
global generator inside the model, is reseeded from (seed, rank, step) at the
start of every step, so no rank's random state needs saving.
"""

import contextlib
import os
import signal
import time
import weakref
from types import SimpleNamespace

import numpy as np
import torch as th
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel.distributed import DistributedDataParallel as DDP

from . import dist_util, logger
from .base import settings
from .base.atomic import DiskFull
from .fp16_util import MixedPrecisionTrainer
from .io.checkpoints import (
    checkpoint_paths,
    find_resume_checkpoint,
    prune_checkpoints,
    save_atomic,
    sibling_checkpoint_paths,
)
from .nn import update_ema
from .resample import LossAwareSampler, UniformSampler, create_named_schedule_sampler
from .script_util import check_state_dict_fits

# Stop after this many optimizer steps in a row with a non-finite loss or gradient.
MAX_NONFINITE_STEPS = 25
# Values to log wait on the device for the next dump, but never more than this many
# entries (with a long --log_interval); handing them to the logger earlier does not
# change what it logs.
MAX_PENDING_LOGS = 1000


def train_defaults():
    """The training flags and their defaults (data, loop, seed and batch, speed)."""
    return settings.defaults(*TRAINING_GROUPS)


# The groups of settings.py a training run has (with the model and the diffusion).
TRAINING_GROUPS = ("data", "training", "run", "speed")


class TrainLoop:
    """
    :param model: the U-Net (on any device; moved to dist_util.dev()).
    :param diffusion: the diffusion process.
    :param data: a function start_batch -> iterator of (batch, model_kwargs), batch of
        shape (N, C_sar + 3, H, W), SAR channels first; start_batch restores the
        data position on resume.
    :param schedule_sampler: a timestep sampler, or its name (default uniform).
    :param validator: a callable (state_dict, step, folder) -> dict of metrics, run on
        rank 0 with the first EMA's weights every ``val_interval`` steps (see validation.py).
        Only rank 0's is used: the other ranks may pass None.
    :param given: settings by name, as declared in settings.py (groups "training",
        "run", "speed", and the model's use_fp16): batch_size (per rank), lr,
        ema_rate, max_steps, resume_checkpoint, ...; a script may pass all its flags.
    """

    def __init__(
        self, *, model, diffusion, data, schedule_sampler=None, validator=None, **given
    ):
        # Every other setting as declared in settings.py; what is not given takes its
        # default, and the loop reads it as self.cfg.NAME.
        self.cfg = cfg = SimpleNamespace(
            **settings.resolve(given, "TrainLoop", "model", *TRAINING_GROUPS)
        )
        check_precision(cfg.use_fp16, cfg.use_bf16)
        self.diffusion = diffusion
        self.data = data
        self.microbatch = cfg.microbatch if cfg.microbatch > 0 else cfg.batch_size
        self.ema_rates = _parse_rates(cfg.ema_rate)
        if isinstance(schedule_sampler, str):  # the setting: a sampler's name
            schedule_sampler = create_named_schedule_sampler(
                schedule_sampler, diffusion
            )
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.validator = validator
        self.val_interval = cfg.val_interval or cfg.save_interval
        self.memory_format = (
            th.channels_last if cfg.channels_last else th.contiguous_format
        )

        self.rank = dist_util.get_rank()
        self.world_size = dist_util.get_world_size()
        self.global_batch = cfg.batch_size * self.world_size
        self.device = dist_util.dev()
        # Every step has the same shapes, so cuDNN's timing of its algorithms at the
        # first step pays off; TF32 changes the numbers, so it is the run's setting.
        dist_util.configure_numerics(use_tf32=cfg.use_tf32, cudnn_benchmark=True)
        logger.log(
            f"TF32 {'on' if cfg.use_tf32 else 'off'} (--use_tf32): float32 matrix "
            "products and convolutions on NVIDIA GPUs in "
            f"{'TensorFloat-32' if cfg.use_tf32 else 'IEEE float32'}"
            + ("" if self.device.type == "cuda" else "; no effect on a CPU")
        )

        self.step = 0
        self.data_position = 0
        self.last_saved_step = None
        self.nonfinite_in_a_row = 0
        self.skipped_steps = 0
        self._stop_signal = None
        # With several ranks, the stop flags of all ranks are summed inside the
        # gradient all-reduce (see _reduce_with_stop_flag); the result lands here.
        self._reduced_stop_flag = None
        self._stop_flag_host = th.zeros(1, pin_memory=self.device.type == "cuda")
        self._stop_flag_copied = th.cuda.Event() if self.device.type == "cuda" else None
        # Values to log, kept on the device until the next dump: reading them in
        # every step (.item(), .cpu()) would make the host wait for the device.
        # Entries: (timesteps, {key: per-example values}) per micro-batch and
        # (None, {key: scalar}) per step, in the order they were computed.
        self._pending_logs = []

        self.model = model.to(self.device, memory_format=self.memory_format)
        self.mp_trainer = MixedPrecisionTrainer(
            model=self.model,
            use_fp16=cfg.use_fp16,
            fp16_scale_growth=cfg.fp16_scale_growth,
        )
        self.opt = th.optim.AdamW(
            self.mp_trainer.master_params,
            lr=self.cfg.lr,
            weight_decay=self.cfg.weight_decay,
            **self._optim_kernel(),
        )
        self.ema_params = [
            [p.detach().clone() for p in self.mp_trainer.master_params]
            for _ in self.ema_rates
        ]

        self._load()
        if self.world_size > 1:
            dist_util.sync_params(self.model.parameters())
            self.ddp_model = DDP(
                self.model,
                device_ids=[self.device] if self.device.type == "cuda" else None,
                bucket_cap_mb=128,
            )
            # The hook's state is a weak reference: a bound method would hold this
            # loop, which holds the DDP model, which holds the hook, a cycle through
            # C++ that gc cannot see, keeping the process group and its threads
            # alive after dist_util.cleanup(), until the interpreter shuts down.
            self.ddp_model.register_comm_hook(weakref.ref(self), _reduce_with_stop_flag)
        else:
            self.ddp_model = self.model
        # The compiled wrapper shares the model's parameters; checkpoints are written
        # from self.model, so their names carry no "_orig_mod." prefix.
        self.forward_model = (
            th.compile(self.ddp_model) if cfg.compile else self.ddp_model
        )

    # -- resume -------------------------------------------------------------------

    def _load(self):
        path = self.cfg.resume_checkpoint
        if path == "auto":
            path = find_resume_checkpoint(logger.get_dir())
            if path is None:
                logger.log(
                    f"resume auto: no checkpoint in {logger.get_dir()}, starting from scratch"
                )
        if path:
            self._load_checkpoint(path)

    def _load_checkpoint(self, path):
        """Restore model, EMA, optimizer and state."""
        paths = sibling_checkpoint_paths(path, self.ema_rates)
        self.step = paths["step"]
        model_path = paths["model"] if os.path.exists(paths["model"]) else path
        if model_path != paths["model"]:
            logger.warn(
                f"{paths['model']} is missing: initialising the model from {path}"
            )
        logger.log(f"resuming from {model_path} (step {self.step})")
        model_state = dist_util.load_state_dict(model_path)
        check_state_dict_fits(self.model.state_dict(), model_state, model_path)
        self.mp_trainer.load_master_params(
            self.mp_trainer.state_dict_to_master_params(model_state)
        )

        for rate, ema_path, params in zip(
            self.ema_rates, paths["ema"], self.ema_params
        ):
            if os.path.exists(ema_path):
                ema_state = dist_util.load_state_dict(ema_path)
                check_state_dict_fits(self.model.state_dict(), ema_state, ema_path)
                values = self.mp_trainer.state_dict_to_master_params(ema_state)
            else:
                logger.warn(
                    f"{ema_path} is missing: the EMA at rate {rate} restarts from the model"
                )
                values = self.mp_trainer.master_params
            with th.no_grad():
                for p, v in zip(params, values):
                    p.copy_(v)

        if os.path.exists(paths["opt"]):
            # The learning rate and the kernel are this run's flags, not the saved ones.
            load_optimizer_state(
                self.opt,
                dist_util.load_state_dict(paths["opt"]),
                lr=self.cfg.lr,
                weight_decay=self.cfg.weight_decay,
                **self._optim_kernel(),
            )
        else:
            logger.warn(f"{paths['opt']} is missing: the optimizer restarts")

        self.data_position = self.step
        if not os.path.exists(paths["state"]):
            logger.log(
                f"{paths['state']} is missing (a checkpoint of the original code?): step {self.step} "
                "is taken from the file name; the data order and loss scale restart"
            )
            return
        state = dist_util.load_state_dict(paths["state"])
        self.step = int(state["step"])
        self.last_saved_step = self.step
        self.data_position = int(state["data_position"])
        if int(state["global_batch"]) != self.global_batch:
            logger.warn(
                f"the checkpoint was trained with a global batch of {int(state['global_batch'])}, "
                f"this run uses {self.global_batch}: the data order continues from batch "
                f"{self.data_position} of the new size"
            )
        self.mp_trainer.lg_loss_scale = float(state["lg_loss_scale"])
        self.schedule_sampler.load_state_dict(state.get("schedule_sampler", {}))
        self.load_extra_state(state)
        # "rng_cpu" and "rng_cuda" are not read: every step reseeds the generators.

    # -- the loop -----------------------------------------------------------------

    def run_loop(self):
        """Train until max_steps or lr_anneal_steps, or a SIGINT/SIGTERM; then save."""
        previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            data = self.data(self.data_position)
            self._tick = (time.perf_counter(), self.step)
            bar = self._progress_bar()
            while not self._finished():
                batch, cond = next(data)
                self.run_step(batch, cond)
                if bar is not None:
                    bar.update(1)
                if self.validator is not None and self.step % self.val_interval == 0:
                    self.validate()
                if self.step % self.cfg.log_interval == 0:
                    self._dump_logs()
                if self.step % self.cfg.save_interval == 0:
                    self.save()
                if self._stop_requested():
                    logger.log(
                        f"stopping at step {self.step} ({self._stop_signal or 'signal on another rank'})"
                    )
                    break
            if bar is not None:
                bar.close()
            if self.step % self.cfg.log_interval:
                self._dump_logs()  # the last, partial interval
            if self.last_saved_step != self.step:
                self.save()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _progress_bar(self):
        total = self.cfg.max_steps or self.cfg.lr_anneal_steps
        if not self.cfg.progress or self.rank != 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=total or None, initial=self.step, desc="training", unit="step"
        )

    def validate(self):
        """Translate the validation pairs with the first EMA's weights (rank 0) and log the scores."""
        # No barrier: the other ranks go on with the next step and wait for rank 0
        # in its gradient all-reduce, so they need neither a validator nor to know
        # when rank 0 validates.
        if self.rank != 0:
            return
        state_dict = self.mp_trainer.master_params_to_state_dict(self.ema_params[0])
        scores = self.validator(state_dict, self.step, logger.get_dir())
        for key, value in scores.items():
            logger.logkv(key, value)
        logger.log(
            f"validation at step {self.step}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
        )

    def _finished(self):
        if self.cfg.max_steps and self.step >= self.cfg.max_steps:
            return True
        return bool(self.cfg.lr_anneal_steps) and self.step >= self.cfg.lr_anneal_steps

    def _on_signal(self, signum, frame):
        if self._stop_signal is not None:
            raise KeyboardInterrupt  # a second signal: stop now, without saving
        self._stop_signal = signal.Signals(signum).name
        logger.log(
            f"{self._stop_signal} received: saving a checkpoint after this step or the next "
            "(again to abort)"
        )

    def reduce_with_stop_flag(self, bucket):
        """
        DDP's gradient all-reduce (the mean of every bucket over the ranks), with
        this rank's stop flag appended to the last bucket. Every rank must leave
        the loop at the same step; carried by the collective the step makes anyway,
        the flags reach all ranks without an all-reduce of their own.

        :param bucket: a torch.distributed.GradBucket of flattened gradients.
        :return: a future of the averaged bucket, as DDP's default hook returns.
        """
        # The last bucket is reduced at the end of the backward pass, so a signal that
        # arrives before then stops the run at this step. Packing the flag costs one
        # copy of that bucket (at most bucket_cap_mb), little next to the step.
        if not bucket.is_last():
            return default_hooks.allreduce_hook(None, bucket)
        buffer = bucket.buffer()
        # new_full writes the value on the device: no copy from the host, no wait.
        flag = buffer.new_full((1,), float(self._stop_signal is not None))
        packed = th.cat([buffer, flag]).div_(self.world_size)
        self._reduced_stop_flag = packed[-1:]  # > 0 once reduced: some rank stops
        future = dist.all_reduce(packed, async_op=True).get_future()
        return future.then(lambda fut: fut.value()[0][:-1])

    def _stop_requested(self):
        """Whether any rank got a stop signal (the same answer on every rank)."""
        if self.world_size == 1:
            return self._stop_signal is not None
        if self._stop_flag_copied is not None:
            # The copy was queued before optimize() read whether the gradient is
            # finite, so the device is already past it: this does not wait.
            self._stop_flag_copied.synchronize()
        return bool(self._stop_flag_host.item() > 0)

    def _queue_stop_flag_copy(self):
        """
        Start copying the stop flags reduced with the gradients to the host: they
        arrive with the read that optimize() makes anyway, not with a wait of their own.
        """
        self._stop_flag_host.copy_(self._reduced_stop_flag, non_blocking=True)
        if self._stop_flag_copied is not None:
            # On the stream of the device the copy runs on, whichever device is
            # current (a validator or a library may have changed it).
            self._stop_flag_copied.record(th.cuda.current_stream(self.device))

    def _optim_kernel(self):
        """AdamW's kernel flags: the fused one, or PyTorch's default choice (None)."""
        if self.cfg.fused_optim:
            return {"fused": True, "foreach": None}
        return {"fused": None, "foreach": None}

    def run_step(self, batch, cond):
        """One optimizer step on this rank's batch: (N, C_sar + 3, H, W), SAR first."""
        batch = batch.to(
            self.device, non_blocking=True, memory_format=self.memory_format
        )
        sar_channels = batch.shape[1] - 3
        condition, x_start = batch[:, :sar_channels], batch[:, sar_channels:]
        t, weights, noise = self._draw_step_randomness(x_start.shape)
        # Dropout draws from the global generators (CPU and CUDA). Seeding them from
        # (seed, rank, step) gives each rank its own stream that a resume, on any
        # number of ranks, continues without saving it.
        th.manual_seed(dropout_seed(self.cfg.seed, self.rank, self.step))
        self._anneal_lr()

        self.mp_trainer.zero_grad()
        num = x_start.shape[0]
        for i in range(0, num, self.microbatch):
            sl = slice(i, i + self.microbatch)
            micro_cond = {
                k: v[sl].to(self.device, non_blocking=True) for k, v in cond.items()
            }
            last = i + self.microbatch >= num
            # DDP decides in the forward pass whether the backward pass all-reduces,
            # so both run inside no_sync: gradients travel once, after the last piece.
            sync = last or self.world_size == 1
            with contextlib.nullcontext() if sync else self.ddp_model.no_sync():
                with th.autocast(
                    self.device.type, dtype=th.bfloat16, enabled=self.cfg.use_bf16
                ):
                    losses = self.diffusion.training_losses(
                        self.forward_model,
                        x_start[sl],
                        condition[sl],
                        t[sl],
                        model_kwargs=micro_cond,
                        noise=noise[sl],
                    )
                if isinstance(self.schedule_sampler, LossAwareSampler):
                    self.schedule_sampler.update_with_local_losses(
                        t[sl], losses["loss"].detach()
                    )
                # Weighted by the piece's share so the gradient is the full batch's mean.
                share = x_start[sl].shape[0] / num
                loss = (losses["loss"] * weights[sl]).mean() * share
                self._pending_logs.append(
                    (t[sl], {k: (v * weights[sl]).detach() for k, v in losses.items()})
                )
                self.mp_trainer.backward(loss)

        if self.world_size > 1:
            self._queue_stop_flag_copy()
        # optimize() reads one number on the host, whether the gradient is finite:
        # the step is skipped (and the fp16 loss scale lowered) exactly when it is not.
        took_step, grad_norm = self.mp_trainer.optimize(
            self.opt, use_foreach=self.cfg.fused_optim
        )
        if took_step:
            for rate, params in zip(self.ema_rates, self.ema_params):
                update_ema(
                    params,
                    self.mp_trainer.master_params,
                    rate=rate,
                    use_foreach=self.cfg.fused_optim,
                )
            self.nonfinite_in_a_row = 0
        else:
            self._on_nonfinite_step()
        self.step += 1
        self.data_position += 1
        logger.logkv("step", self.step)
        logger.logkv("samples", self.step * self.global_batch)
        self._pending_logs.append((None, {"grad_norm": grad_norm.detach()}))
        if len(self._pending_logs) >= MAX_PENDING_LOGS:
            self._flush_logs()  # the same numbers, read earlier: memory stays bounded
        logger.logkv("lr", self.opt.param_groups[0]["lr"])
        if self.mp_trainer.use_fp16:
            logger.logkv("lg_loss_scale", self.mp_trainer.lg_loss_scale)

    def _draw_step_randomness(self, shape):
        """Timesteps, importance weights and noise of this rank's block of the global batch."""
        rng = np.random.default_rng([self.cfg.seed, self.step, 1])
        # Drawn on the host and copied without waiting: a blocking copy to a GPU
        # would wait for the work queued there, once per step.
        t, weights = (
            x.to(self.device, non_blocking=True)
            for x in self.schedule_sampler.sample(self.global_batch, "cpu", rng=rng)
        )
        gen = th.Generator(device=self.device).manual_seed(
            derive_seed(self.cfg.seed, self.step, 2)
        )
        noise = th.randn(
            (self.global_batch, *shape[1:]), generator=gen, device=self.device
        ).contiguous(memory_format=self.memory_format)
        block = slice(self.rank * shape[0], (self.rank + 1) * shape[0])
        return t[block], weights[block], noise[block]

    def _on_nonfinite_step(self):
        self.nonfinite_in_a_row += 1
        self.skipped_steps += 1
        logger.logkv("skipped_steps", self.skipped_steps)
        if self.mp_trainer.use_fp16:
            # Overflows are expected while the loss scale settles.
            limit = MAX_NONFINITE_STEPS + 20
        else:
            limit = MAX_NONFINITE_STEPS
            logger.warn(
                f"step {self.step}: the loss or gradient is not finite; step skipped"
            )
        if self.nonfinite_in_a_row >= limit:
            raise FloatingPointError(
                f"the loss was not finite for {self.nonfinite_in_a_row} steps in a row (step {self.step}); "
                "try a lower --lr, --use_fp16 False (or --use_bf16 True), and check the data for broken "
                f"images. The last good checkpoint is in {logger.get_dir()}"
            )

    def _anneal_lr(self):
        """
        Set the learning rate of the coming step from the step number alone. The
        optimizer's state carries no schedule, so a resumed run would otherwise take
        its first step at the base rate.
        """
        if not self.cfg.lr_anneal_steps:
            return
        frac_done = self.step / self.cfg.lr_anneal_steps
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.lr * (1 - frac_done)

    def _flush_logs(self):
        """
        Hand the values kept on the device since the last dump to the logger, in the
        order they were recorded: the same calls, with the same numbers, that logging
        them at every step would have made.
        """
        for ts, values in self._pending_logs:
            if ts is None:  # a per-step scalar
                for key, value in values.items():
                    logger.logkv_mean(key, value.item())
                continue
            for key, per_example in values.items():
                logger.logkv_mean(key, per_example.mean().item())
                # Also by quarter of the diffusion process, as guided-diffusion logs them.
                for sub_t, sub_loss in zip(ts.cpu().numpy(), per_example.cpu().numpy()):
                    quartile = int(4 * sub_t / self.diffusion.num_timesteps)
                    logger.logkv_mean(f"{key}_q{quartile}", sub_loss)
        self._pending_logs.clear()

    def _dump_logs(self):
        self._flush_logs()
        now = time.perf_counter()
        last_time, last_step = self._tick
        if self.step > last_step:
            logger.logkv(
                "images_per_s",
                (self.step - last_step) * self.global_batch / (now - last_time),
            )
        self._tick = (now, self.step)
        logger.dumpkvs()

    # -- checkpoints --------------------------------------------------------------

    def save(self):
        """Write the checkpoint of the current step (rank 0), state file last."""
        if self.rank == 0:
            try:
                self._save_files(logger.get_dir())
            except DiskFull as err:
                survivor = find_resume_checkpoint(logger.get_dir())
                survives = (
                    f"the newest complete checkpoint, {survivor}, survives"
                    if survivor
                    else "no complete checkpoint survives"
                )
                raise DiskFull(
                    err.path,
                    f"{err}; {survives}: free space and rerun with --resume_checkpoint auto",
                ) from None
        self.last_saved_step = self.step
        dist_util.barrier()

    def extra_state(self):
        """
        What a loop built on this one saves in the state file besides (a
        discriminator and its optimizer: distillation.py): name -> object; none here.
        """
        return {}

    def load_extra_state(self, state):
        """Restore :meth:`extra_state` from a checkpoint's state dict; nothing here."""

    def _save_files(self, folder):
        """The checkpoint's files in ``folder``, state file last."""
        paths = checkpoint_paths(folder, self.step, self.ema_rates)
        save_atomic(
            contiguous_state_dict(self.mp_trainer.master_params_to_state_dict()),
            paths["model"],
        )
        for ema_path, params in zip(paths["ema"], self.ema_params):
            save_atomic(
                contiguous_state_dict(
                    self.mp_trainer.master_params_to_state_dict(params)
                ),
                ema_path,
            )
        save_atomic(self.opt.state_dict(), paths["opt"])
        state = {
            "step": self.step,
            "data_position": self.data_position,
            "global_batch": self.global_batch,
            "seed": self.cfg.seed,
            "lg_loss_scale": float(self.mp_trainer.lg_loss_scale),
            "schedule_sampler": self.schedule_sampler.state_dict(),
            # Rank 0's generators, kept for the file's documented layout and for
            # inspection; a resume reseeds from (seed, rank, step) instead.
            "rng_cpu": th.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = th.cuda.get_rng_state(self.device)
        state.update(self.extra_state())
        save_atomic(state, paths["state"])
        logger.log(f"saved checkpoint {paths['model']}")
        if self.cfg.keep_checkpoints > 0:
            prune_checkpoints(folder, self.cfg.keep_checkpoints)


def check_precision(use_fp16, use_bf16):
    """Refuse two reduced precisions at once: the model runs in one of them."""
    if use_fp16 and use_bf16:
        raise ValueError(
            "--use_fp16 True and --use_bf16 True cannot be used together: choose one "
            "(bf16 keeps float32's range and needs no loss scaling; fp16 is the "
            "original's, for GPUs without bfloat16)"
        )


def _parse_rates(ema_rate):
    if isinstance(ema_rate, float):
        return [ema_rate]
    try:
        rates = [float(x) for x in str(ema_rate).split(",") if x.strip()]
    except ValueError:
        rates = []
    if not rates or not all(0.0 < r < 1.0 for r in rates):
        raise ValueError(
            f"--ema_rate {ema_rate!r}: expected rates in (0, 1) like 0.9999 or 0.9999,0.999"
        )
    return rates


def derive_seed(*values):
    """A 63-bit seed derived from integers (e.g. seed, rank, step) by hashing them."""
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(
        2, dtype=np.uint32
    )
    return (int(state[0]) << 31 | int(state[1])) & ((1 << 63) - 1)


def dropout_seed(seed, rank, step):
    """
    The seed of a rank's global generators (dropout) at a step.

    :param seed: the run's --seed.
    :param rank: the process's global rank.
    :param step: the step about to be taken.
    """
    # The 3 keeps this stream apart from the timestep (1) and noise (2)
    # streams, which are seeded from (seed, step, stream).
    return derive_seed(seed, step, 3, rank)


def load_optimizer_state(opt, state_dict, **settings):
    """
    Load an optimizer's saved state with this run's settings of its groups.

    The state is read on the host and placed by Optimizer.load_state_dict: each
    moment on its parameter's device, the step counters there only for the fused
    (or capturable) kernels, which read them on the device; the other kernels read
    them on the host at every step, for every parameter. It decides by the flags of
    the groups in ``state_dict``, so this run's settings are put there first.

    :param opt: the optimizer, built with this run's parameters.
    :param state_dict: its saved state dict, with tensors on the CPU (changed).
    :param settings: values for every parameter group (lr, fused, ...).
    """
    for group in state_dict["param_groups"]:
        group.update(settings)
    opt.load_state_dict(state_dict)


def contiguous_state_dict(state_dict):
    """
    The state dict with every tensor in the standard (contiguous) memory layout, so
    that a run with ``channels_last`` writes the same files as one without. Changed
    in place (keeping the dict's metadata) and returned.
    """
    for key in list(state_dict):
        state_dict[key] = state_dict[key].contiguous()
    return state_dict


def _reduce_with_stop_flag(loop_ref, bucket):
    """DDP's comm hook: TrainLoop.reduce_with_stop_flag of the loop ``loop_ref`` refers to."""
    return loop_ref().reduce_with_stop_flag(bucket)
