"""
Consistency distillation in the teacher's own discrete schedule (Luo et al. 2023,
"Latent Consistency Models", after Song et al. 2023, "Consistency Models"): the
method of scripts/image_distill.py.

Each step takes clean pairs (x_0, SAR) from the training data and, per image, a
pair of the teacher's timesteps (t, s) from the skip grid: t = T - 1 - j k for
j = 0, 1, ... while t >= 1, and s = max(t - k, 0). The grid's top is T - 1, where
one-step sampling starts; its bottom pair ends at s = 0, where the consistency
function is the identity (base/consistency.py), which anchors every chain to the
data. (With T = 1000 and k = 20: t = 999, 979, ..., 19; the last skip, 19 -> 0, is
the only shorter one, as LCM's clamp to 0 makes it.)

    1. x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps               (q_sample)
    2. x_s = one DDIM step (eta = 0) of the frozen teacher from t to s, with its
       x_0 prediction clipped to [-1, 1] as its sampler does       (the solver)
    3. target = f_target(x_s, s), the target network (an EMA of the student at
       --target_ema) with no gradient; f(x, 0) = x at the boundary
    4. loss = d(f_student(x_t, t), target) per image: pseudo-Huber
       sqrt(||.||^2 + c^2) - c (Song & Dhariwal 2023, "Improved Techniques for
       Training Consistency Models") or the mean squared error.

The loop is train_util.TrainLoop's, with :class:`ConsistencyDistillation` in the
place of the diffusion (it offers ``training_losses`` with the same signature) and
:class:`SkipGridSampler` as the timestep sampler, so distillation has everything
training has: ranks, exact resume, atomic checkpoints, bf16, the logs. The target
network's weights are the loop's EMA at --target_ema (saved and resumed as
``ema_<rate>_NNNNNN.pt``, like every EMA).

With --adv_weight w > 0 an adversarial term joins the loss, as Bai et al. 2024
("Accelerating Diffusion for SAR-to-Optical Image Translation via Adversarial
Consistency Distillation", arXiv 2407.06095) add one against blur and colour shift:
a :class:`Discriminator` made from the teacher's encoder judges the student's x_0,
f(x_t, t), against the real x_0, both with the SAR; the student's loss gains
w * (-D(f)), and the discriminator takes a hinge-loss step after each of the
student's steps (its head and optimizer are saved in the state file).
"""

import copy
import math

import numpy as np
import torch as th
import torch.distributed as dist
from torch import nn

from . import dist_util
from .base.consistency import ConsistencyModel
from .nn import conv_nd, normalization, timestep_embedding
from .resample import ScheduleSampler
from .train_util import TrainLoop, _parse_rates, derive_seed

# The pseudo-Huber constant per unit of sqrt(C H W) (Song & Dhariwal 2023): the
# constant scales with the norm of an image's difference.
HUBER_C_PER_SQRT_DIM = 0.00054
DISTANCES = ("huber", "l2")


def distillation_defaults():
    """The distillation flags, name -> (default, help), in the order the script lists them."""
    return {
        "teacher_path": ("", "the teacher: a model or EMA file of a training run, with "
                             "its config.json beside it (required)"),
        "skip": (20, "k: the teacher's timesteps between a pair (t, t - k) of one step"),
        "distance": ("huber", "the distance between the student and the target: "
                              "huber (pseudo-Huber) or l2 (mean squared error)"),
        "huber_c": (-1.0, "the pseudo-Huber constant c; negative: 0.00054 sqrt(C H W) "
                          "(Song & Dhariwal 2023)"),
        "target_ema": (0.95, "the EMA rate of the target network (one of the run's "
                             "EMAs: saved as ema_<rate>_NNNNNN.pt)"),
        "adv_weight": (0.0, "the weight of the adversarial term (a discriminator on the "
                            "teacher's frozen encoder); 0: none"),
    }  # fmt: skip


def skip_grid(num_timesteps, skip):
    """
    The pairs (t, s) of the teacher's timesteps that distillation trains on (see the
    module's docstring).

    :param num_timesteps: the teacher's T.
    :param skip: k, 1 <= k < T.
    :return: (t, s), int64 arrays, t descending from T - 1.
    :raises ValueError: a skip outside 1 .. T - 1.
    """
    if not 1 <= skip < num_timesteps:
        raise ValueError(
            f"--skip {skip}: the teacher has {num_timesteps} timesteps; give 1 to "
            f"{num_timesteps - 1} (20 of 1000 is LCM's)"
        )
    t = np.arange(num_timesteps - 1, 0, -skip, dtype=np.int64)
    return t, np.maximum(t - skip, 0)


def resolve_huber_c(huber_c, shape):
    """The pseudo-Huber constant: ``huber_c``, or when negative the default for images of ``shape`` (C, H, W)."""
    return huber_c if huber_c >= 0 else HUBER_C_PER_SQRT_DIM * math.sqrt(math.prod(shape))


class SkipGridSampler(ScheduleSampler):
    """
    The timestep t of each image, uniform over the skip grid's t (:func:`skip_grid`),
    with importance weight 1: the objective is the grid's mean, not the whole
    schedule's.
    """

    def __init__(self, num_timesteps, skip):
        t, _ = skip_grid(num_timesteps, skip)
        self._weights = np.zeros([num_timesteps])
        self._weights[t] = 1.0

    def weights(self):
        return self._weights

    def sample(self, batch_size, device, rng=None):
        indices, _ = super().sample(batch_size, device, rng=rng)
        return indices, th.ones(batch_size, device=device)


def teacher_x0(out, x_t, a, s, mean_type):
    """The x_0 a network's output means in its parametrisation (noise, x_0 or v)."""
    if mean_type == "x_start":
        return out
    if mean_type == "eps":
        return (x_t - s * out) / a
    return a * x_t - s * out  # v = a eps - s x_0


class Discriminator(nn.Module):
    """
    A discriminator made from the teacher's encoder: copies of its time embedding,
    input blocks and middle block, frozen, read at t = 0 on cat([x_0, SAR]) (a clean
    image and its condition, the teacher's own input), and a small trainable head on
    the middle block's features (norm, SiLU, 3x3 conv, SiLU, 1x1 conv), averaged
    over positions. Frozen, the encoder keeps the teacher's features, which a few
    thousand steps of a hinge game could only wear down; the head learns the game.

    :param teacher: the teacher (a UNetModel, float32).
    """

    def __init__(self, teacher):
        super().__init__()
        self.model_channels = teacher.model_channels
        self.time_embed = copy.deepcopy(teacher.time_embed)
        self.input_blocks = copy.deepcopy(teacher.input_blocks)
        self.middle_block = copy.deepcopy(teacher.middle_block)
        for p in self.parameters():
            p.requires_grad_(False)
        ch = teacher.middle_block[-1].out_channels
        self.head = nn.Sequential(
            normalization(ch), nn.SiLU(), conv_nd(2, ch, ch, 3, padding=1), nn.SiLU(),
            conv_nd(2, ch, 1, 1),
        )  # fmt: skip

    def forward(self, x_0, condition):
        """
        :param x_0: images, (N, C, H, W); :param condition: their SAR, (N, C_sar, H, W).
        :return: (N,) logits, high for real.
        """
        t = th.zeros(x_0.shape[0], device=x_0.device, dtype=th.long)
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        h = th.cat([x_0, condition.to(x_0.dtype)], 1)
        for module in self.input_blocks:
            h = module(h, emb)
        h = self.middle_block(h, emb)
        return self.head(h).float().mean(dim=(1, 2, 3))


class ConsistencyDistillation:
    """
    The distillation loss, offered as a diffusion's ``training_losses`` so that
    TrainLoop runs it.

    :param diffusion: the teacher's diffusion, not respaced (its schedule, q_sample
        and timestep scaling).
    :param teacher: the frozen teacher network.
    :param target: the target network (the EMA's weights; no gradient flows to it).
    :param mean_type: what the networks predict, "eps", "x_start" or "v".
    :param skip: k, the timesteps between t and s.
    :param distance: "huber" or "l2".
    :param huber_c: the pseudo-Huber constant (for "huber").
    :param channels: the optical channels C.
    :param discriminator: a :class:`Discriminator` for the adversarial term, or None.
    :param adv_weight: the term's weight w.
    """

    def __init__(
        self, diffusion, teacher, target, *, mean_type, skip, distance, huber_c, channels=3,
        discriminator=None, adv_weight=0.0,
    ):  # fmt: skip
        if distance not in DISTANCES:
            raise ValueError(f"--distance {distance!r}: choose huber or l2")
        self.diffusion = diffusion
        self.num_timesteps = diffusion.num_timesteps  # TrainLoop logs by quarter of it
        self.teacher = teacher
        self.target = target
        self.mean_type = mean_type
        self.skip = skip
        self.distance = distance
        self.huber_c = huber_c
        self.channels = channels
        self.alphas_cumprod = th.from_numpy(diffusion.alphas_cumprod)
        self._wrapped = {}  # id(network) -> its ConsistencyModel
        self.discriminator = discriminator
        self.adv_weight = adv_weight
        # (the student's x_0, detached; the real x_0; the SAR) of each micro-batch
        # since the discriminator's last step
        self.stash = []

    def consistency_model(self, net):
        """``net`` read as a consistency function in the teacher's schedule (made
        once per network: every training step reads the student and the target)."""
        if id(net) not in self._wrapped:
            self._wrapped[id(net)] = ConsistencyModel(
                net, self.diffusion.alphas_cumprod, self.mean_type, self.channels,
                rescale_timesteps=self.diffusion.rescale_timesteps,
            )  # fmt: skip
        return self._wrapped[id(net)]

    def _abar(self, t, like):
        if self.alphas_cumprod.device != like.device:  # once: not a copy every step
            self.alphas_cumprod = self.alphas_cumprod.to(like.device)
        abar = self.alphas_cumprod[t].to(like.dtype)
        return abar.view(-1, *([1] * (like.dim() - 1)))

    def teacher_step(self, x_t, condition, t, s, model_kwargs):
        """
        One deterministic DDIM step (eta = 0) of the teacher from t to s, per image.

        :return: x_s, (N, C, H, W).
        """
        scale = self.diffusion._scale_timesteps
        out = self.teacher(th.cat([x_t, condition.to(x_t.dtype)], 1), scale(t), **model_kwargs)
        a_t, a_s = self._abar(t, x_t), self._abar(s, x_t)
        # 1. the teacher's x_0, clipped as its sampler clips it, and the noise it implies
        x0 = teacher_x0(out[:, : self.channels], x_t, a_t.sqrt(), (1 - a_t).sqrt(), self.mean_type)
        x0 = x0.clamp(-1, 1)
        eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        # 2. DDIM's eq. 12 at eta = 0
        return a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps

    def training_losses(self, model, x_start, condition, t, model_kwargs=None, noise=None):
        """
        The distillation loss per image (TrainLoop's call of a diffusion's losses).

        :param model: the student network (through DDP when there are ranks).
        :param x_start: clean optical images, (N, C, H, W).
        :param condition: the SAR images, (N, C_sar, H, W).
        :param t: timesteps of the skip grid, (N,).
        :return: {"loss": (N,)}.
        """
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = th.randn_like(x_start)
        s = (t - self.skip).clamp(min=0)
        scale = self.diffusion._scale_timesteps
        x_t = self.diffusion.q_sample(x_start, t, noise=noise).to(x_start.dtype)
        with th.no_grad():
            x_s = self.teacher_step(x_t, condition, t, s, model_kwargs)
            target, _ = self.consistency_model(self.target).consistency(
                th.cat([x_s, condition.to(x_s.dtype)], 1), scale(s), **model_kwargs
            )
        f, _ = self.consistency_model(model).consistency(
            th.cat([x_t, condition.to(x_t.dtype)], 1), scale(t), **model_kwargs
        )
        diff = (f.float() - target.float()).flatten(1)
        if self.distance == "l2":
            loss = diff.pow(2).mean(1)
        else:
            loss = (diff.pow(2).sum(1) + self.huber_c**2).sqrt() - self.huber_c
        if not self.adv_weight:
            return {"loss": loss}
        # the generator's hinge term: raise the discriminator's score of f
        adv = -self.discriminator(f, condition)
        self.stash.append((f.detach(), x_start, condition))
        return {"loss": loss + self.adv_weight * adv, "consistency": loss, "adv": adv}


class DistillationLoop(TrainLoop):
    """
    TrainLoop on the distillation loss: the student (``model``, initialised from the
    teacher) is trained, the target network follows the EMA at ``target_ema``.

    :param model: the student network (the teacher's architecture and weights).
    :param diffusion: the teacher's diffusion, not respaced.
    :param teacher: the teacher network (frozen here).
    :param target: a network of the same architecture in float32; its parameters are
        made to share the EMA's tensors, so it is the target network at every step.
    :param mean_type: what the networks predict.
    :param skip: k; :param distance: "huber" or "l2"; :param huber_c: c (negative: the
        default for the image size).
    :param adv_weight: the adversarial term's weight (0: none; see :class:`Discriminator`).
    :param target_ema: the target's EMA rate; put first in ``ema_rate`` (added when
        not in it), so that validation translates with the target's weights.
    :param given: TrainLoop's settings (batch_size, lr, ema_rate, ...).
    """

    def __init__(
        self, *, model, diffusion, teacher, target, data, mean_type, skip=20,
        distance="huber", huber_c=-1.0, target_ema=0.95, adv_weight=0.0, validator=None,
        **given,
    ):  # fmt: skip
        rates = _parse_rates(given.get("ema_rate", "0.9999"))
        if not 0.0 < target_ema < 1.0:
            raise ValueError(f"--target_ema {target_ema}: a rate in (0, 1) like 0.95")
        # The target first: TrainLoop validates with the first EMA.
        rates = [target_ema] + [r for r in rates if r != target_ema]
        given["ema_rate"] = ",".join(str(r) for r in rates)
        given.pop("schedule_sampler", None)  # the skip grid's
        size = given.get("image_size", 256)
        self.huber_c = resolve_huber_c(huber_c, (3, size, size))
        teacher.eval().requires_grad_(False)
        target.eval().requires_grad_(False)
        # Made before TrainLoop, whose resume restores it (load_extra_state); the head's
        # initial weights from the seed alone, so every rank starts with the same.
        self.discriminator = self.disc_opt = None
        if adv_weight:
            with th.random.fork_rng(devices=[]):
                th.manual_seed(derive_seed(given.get("seed", 0), 4))
                self.discriminator = Discriminator(teacher).to(dist_util.dev())
            self.disc_opt = th.optim.AdamW(
                self.discriminator.head.parameters(), lr=given.get("lr", 1e-4),
                betas=(0.0, 0.99), weight_decay=0.0,
            )  # fmt: skip
        loss = ConsistencyDistillation(
            diffusion, teacher, target, mean_type=mean_type, skip=skip,
            distance=distance, huber_c=self.huber_c, discriminator=self.discriminator,
            adv_weight=adv_weight,
        )  # fmt: skip
        super().__init__(
            model=model, diffusion=loss, data=data, validator=validator,
            schedule_sampler=SkipGridSampler(diffusion.num_timesteps, skip), **given,
        )  # fmt: skip
        self.target = target.to(self.device)
        self.target_index = self.ema_rates.index(target_ema)
        # The EMA is updated in place (nn.update_ema, and the resume's copy), so the
        # target's parameters, once they are its tensors, follow it without a copy.
        for p, ema in zip(self.target.parameters(), self.ema_params[self.target_index]):
            if p.shape != ema.shape:
                raise ValueError("the target network's architecture is not the student's")
            p.data = ema

    def run_step(self, batch, cond):
        """The student's step (TrainLoop's), then the discriminator's."""
        super().run_step(batch, cond)
        if self.discriminator is not None:
            self._discriminator_step()

    def _discriminator_step(self):
        """
        One hinge-loss step of the discriminator's head on this step's real and
        generated x_0: mean(relu(1 - D(real))) + mean(relu(1 + D(fake))), its
        gradient averaged over the ranks (each holds its block of the global batch).
        """
        stash = self.diffusion.stash
        fake, real, sar = (th.cat(parts) for parts in zip(*stash))
        stash.clear()
        self.disc_opt.zero_grad(set_to_none=True)  # the generator's term reached the head too
        with th.autocast(self.device.type, dtype=th.bfloat16, enabled=self.cfg.use_bf16):
            d_real = self.discriminator(real, sar)
            d_fake = self.discriminator(fake, sar)
        loss = th.relu(1 - d_real).mean() + th.relu(1 + d_fake).mean()
        loss.backward()
        if self.world_size > 1:
            for p in self.discriminator.head.parameters():
                dist.all_reduce(p.grad)
                p.grad.div_(self.world_size)
        self.disc_opt.step()
        self._pending_logs.append((None, {"disc_loss": loss.detach()}))

    def extra_state(self):
        if self.discriminator is None:
            return {}
        return {
            "discriminator_head": self.discriminator.head.state_dict(),
            "discriminator_opt": self.disc_opt.state_dict(),
        }

    def load_extra_state(self, state):
        if self.discriminator is None:
            return
        if "discriminator_head" not in state:
            return  # a checkpoint without the term: the discriminator starts here
        self.discriminator.head.load_state_dict(state["discriminator_head"])
        self.disc_opt.load_state_dict(state["discriminator_opt"])
