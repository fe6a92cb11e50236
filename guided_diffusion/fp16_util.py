"""
Mixed precision: the U-Net body in float16 with float32 master weights and loss
scaling, as guided-diffusion does.
"""

import torch as th
from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def convert_module_to_f16(module):
    """Convert the weights of a convolution to float16 (other layers stay float32)."""
    if isinstance(module, _CONVS):
        module.weight.data = module.weight.data.half()
        if module.bias is not None:
            module.bias.data = module.bias.data.half()


def convert_module_to_f32(module):
    """Undo convert_module_to_f16."""
    if isinstance(module, _CONVS):
        module.weight.data = module.weight.data.float()
        if module.bias is not None:
            module.bias.data = module.bias.data.float()


class MixedPrecisionTrainer:
    """
    Owns the parameters the optimizer updates and the backward pass.

    fp32 (default): the optimizer updates the model's parameters directly.
    fp16 (``use_fp16``, as the original): the U-Net body runs in float16 while the
    optimizer updates float32 master copies; the loss is multiplied by 2**lg_loss_scale
    before backward. When a gradient overflows, the step is skipped and the scale
    halved; otherwise the scale grows by ``fp16_scale_growth`` (in log2) per step.

    :param model: the model (with convert_to_fp16 for use_fp16).
    :param initial_lg_loss_scale: log2 of the initial loss scale.
    """

    def __init__(
        self,
        *,
        model,
        use_fp16=False,
        fp16_scale_growth=1e-3,
        initial_lg_loss_scale=20.0,
    ):
        self.model = model
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = fp16_scale_growth
        self.lg_loss_scale = initial_lg_loss_scale
        self.param_names = [name for name, _ in model.named_parameters()]
        self.model_params = list(model.parameters())
        self.master_params = self.model_params
        if use_fp16:
            self.master_params = [
                p.detach().float().clone().requires_grad_(True)
                for p in self.model_params
            ]
            model.convert_to_fp16()

    def zero_grad(self):
        for p in self.model_params:
            p.grad = None
        if self.use_fp16:
            for p in self.master_params:
                p.grad = None

    def backward(self, loss):
        if self.use_fp16:
            loss = loss * (2**self.lg_loss_scale)
        loss.backward()

    def optimize(self, opt, use_foreach=False):
        """
        Take an optimizer step with the accumulated gradients, unless they are not finite.

        :param use_foreach: compute the gradient norm with one multi-tensor op
            instead of a loop over the parameters (the same value).
        :return: a tuple (took_step, grad_norm), grad_norm a float tensor (unscaled).
        """
        if self.use_fp16:
            for master, param in zip(self.master_params, self.model_params):
                master.grad = (
                    param.grad.float()
                    if param.grad is not None
                    else th.zeros_like(master)
                )
            scale = 2**self.lg_loss_scale
        else:
            scale = 1.0
        grads = [p.grad for p in self.master_params if p.grad is not None]
        if use_foreach:
            norms = th._foreach_norm(grads)
        else:
            norms = [th.linalg.vector_norm(g.float()) for g in grads]
        grad_norm = th.linalg.vector_norm(th.stack(norms).float()) / scale
        if not th.isfinite(grad_norm):
            if self.use_fp16:
                self.lg_loss_scale -= 1
            self.zero_grad()
            return False, grad_norm
        if self.use_fp16:
            th._foreach_mul_(grads, 1.0 / scale)
        opt.step()
        self.zero_grad()
        if self.use_fp16:
            for master, param in zip(self.master_params, self.model_params):
                param.data.copy_(master.data)
            self.lg_loss_scale += self.fp16_scale_growth
        return True, grad_norm

    def master_params_to_state_dict(self, params=None):
        """
        A float32 state dict of the model with the values of ``params`` (default: the
        master parameters), in the model's own key order.
        """
        params = self.master_params if params is None else params
        state_dict = self.model.state_dict()
        for name, value in zip(self.param_names, params):
            state_dict[name] = value.detach().float().clone()
        return state_dict

    def state_dict_to_master_params(self, state_dict):
        """The master-parameter list of a model state dict (float32 copies)."""
        return [state_dict[name].detach().float().clone() for name in self.param_names]

    def load_master_params(self, params):
        """Copy values into the master parameters and the model."""
        with th.no_grad():
            for master, param, value in zip(
                self.master_params, self.model_params, params
            ):
                master.copy_(value)
                if master is not param:
                    param.copy_(value)
