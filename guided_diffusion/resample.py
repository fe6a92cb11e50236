"""
Timestep samplers for training: uniform, or importance sampling by the loss history
(improved DDPM's "loss-second-moment" sampler, which lowers the variance of the VB loss).
"""

from abc import ABC, abstractmethod

import numpy as np
import torch as th
import torch.distributed as dist


def create_named_schedule_sampler(name, diffusion):
    """
    The timestep sampler of a name.

    :param name: "uniform" or "loss-second-moment".
    :param diffusion: the diffusion process to sample timesteps for.
    """
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise ValueError(
        f"unknown --schedule_sampler {name!r}: use 'uniform' or 'loss-second-moment'"
    )


class ScheduleSampler(ABC):
    """
    A distribution over timesteps, used with importance weights so the loss stays an
    unbiased estimate of the uniformly weighted objective.
    """

    @abstractmethod
    def weights(self):
        """A numpy array of positive weights, one per diffusion step."""

    def sample(self, batch_size, device, rng=None):
        """
        Draw timesteps and their importance weights.

        :param batch_size: the number of timesteps.
        :param device: the device of the returned tensors.
        :param rng: a numpy Generator; None uses numpy's global generator (as the
            original code does).
        :return: a tuple (timesteps, weights), both (batch_size,) tensors.
        """
        w = self.weights()
        p = w / np.sum(w)
        choice = np.random.choice if rng is None else rng.choice
        indices_np = choice(len(p), size=(batch_size,), p=p)
        indices = th.from_numpy(indices_np).long().to(device)
        weights_np = 1 / (len(p) * p[indices_np])
        weights = th.from_numpy(weights_np).float().to(device)
        return indices, weights

    def state_dict(self):
        """The sampler's learned state, as tensors (empty for stateless samplers)."""
        return {}

    def load_state_dict(self, state):  # noqa: B027 (stateless samplers have nothing to restore)
        """Restore :meth:`state_dict`."""


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self):
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """
    A sampler that adapts to the losses observed at each timestep.

    The losses reach the host without a wait of their own: each update starts a
    copy to the host that does not block, and is applied when the weights are next
    needed (the next step's draw). By then the training step has read whether its
    gradient is finite, after the copy was queued, so the copy is done.
    """

    def __init__(self):
        # updates whose values are on their way to the host, oldest first:
        # ((timesteps, losses), the event that says they arrived, or None)
        self._pending = []

    def update_with_local_losses(self, local_ts, local_losses):
        """
        Update with this rank's timesteps and losses; collective over all ranks, so
        every rank ends with the same state.

        :param local_ts: an integer tensor of timesteps.
        :param local_losses: a 1-D tensor of losses.
        """
        if (
            not (dist.is_available() and dist.is_initialized())
            or dist.get_world_size() == 1
        ):
            self._pending.append(_start_copy_to_host(local_ts, local_losses))
            return
        world = dist.get_world_size()
        device = local_ts.device
        batch_sizes = [th.zeros(1, dtype=th.int64, device=device) for _ in range(world)]
        dist.all_gather(
            batch_sizes, th.full((1,), len(local_ts), dtype=th.int64, device=device)
        )
        # the one value read at once: the padding's size is needed on the host
        batch_sizes = [int(x.item()) for x in batch_sizes]
        max_bs = max(batch_sizes)
        # all_gather needs equal shapes: pad to the largest batch.
        ts_padded = th.zeros(max_bs, dtype=local_ts.dtype, device=device)
        ts_padded[: len(local_ts)] = local_ts
        losses_padded = th.zeros(max_bs, dtype=local_losses.dtype, device=device)
        losses_padded[: len(local_losses)] = local_losses
        ts_batches = [th.zeros_like(ts_padded) for _ in range(world)]
        loss_batches = [th.zeros_like(losses_padded) for _ in range(world)]
        dist.all_gather(ts_batches, ts_padded)
        dist.all_gather(loss_batches, losses_padded)
        self._pending.append(
            _start_copy_to_host(
                th.cat([y[:bs] for y, bs in zip(ts_batches, batch_sizes)]),
                th.cat([y[:bs] for y, bs in zip(loss_batches, batch_sizes)]),
            )
        )

    def apply_pending_updates(self):
        """Apply the updates on their way to the host (waiting for their copies)."""
        for (ts, losses), copied in self._pending:
            if copied is not None:
                copied.synchronize()
            self.update_with_all_losses(ts.tolist(), losses.tolist())
        self._pending.clear()

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """
        Update with the timesteps and losses of all ranks; must give the same result
        on every rank.

        :param ts: a list of int timesteps.
        :param losses: a list of float losses, one per timestep.
        """


class LossSecondMomentResampler(LossAwareSampler):
    """
    Samples t with probability proportional to sqrt(E[loss_t^2]) over the last
    ``history_per_term`` losses, mixed with a little uniform probability; uniform
    until every timestep has a full history.
    """

    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        super().__init__()
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros(
            [diffusion.num_timesteps, history_per_term], dtype=np.float64
        )
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self):
        self.apply_pending_updates()
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                # Drop the oldest loss.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return (self._loss_counts == self.history_per_term).all()

    def state_dict(self):
        self.apply_pending_updates()
        return {
            "loss_history": th.from_numpy(self._loss_history.copy()),
            "loss_counts": th.from_numpy(self._loss_counts.copy()),
        }

    def load_state_dict(self, state):
        history = state["loss_history"].numpy()
        if history.shape != self._loss_history.shape:
            raise ValueError(
                f"the saved timestep-sampler history has shape {tuple(history.shape)}, "
                f"this run needs {self._loss_history.shape}: --diffusion_steps changed?"
            )
        self._pending.clear()
        self._loss_history = history.astype(np.float64).copy()
        self._loss_counts = state["loss_counts"].numpy().astype(np.int64).copy()


def _start_copy_to_host(*tensors):
    """
    Start copying device tensors to the host without blocking.

    :return: (the host tensors, a CUDA event to wait on before reading them, or
        None where they are ready).
    """
    device = tensors[0].device
    # Only CUDA's copies are awaited by an event; on meta no data moves, and its
    # copy is made as on CUDA so that a CPU can check that it does not block.
    non_blocking = device.type in ("cuda", "meta")
    copies = tuple(t.detach().to("cpu", non_blocking=non_blocking) for t in tensors)
    copied = None
    if device.type == "cuda":
        copied = th.cuda.Event()
        copied.record(th.cuda.current_stream(device))
    return copies, copied
