"""The model contract: everything train_script.py, visualization.py, random_generation.py and fid.py may ask of
a model, in one place.

A model is one module (file) with
    Config           a dataclass; each field, made with common.option(default, help), becomes a --flag
    TRAIN_DEFAULTS   a dict: the model's defaults for the common training flags (epochs, lr, batch_size, ...)
    Model(config, image_shape, num_classes)   returns a GenerativeModel (below)
    stages(args)     optional: the runs to train, in order, each a copy of the parsed flags (latent diffusion:
                     its autoencoder, then diffusion on its latents); without it, one run
and one line in registry.MODELS. The scripts never ask which model they hold: they read the capabilities
below and call the methods.
"""
import copy
from contextlib import nullcontext

import torch
import torch.nn as nn

from common import UserError


class GenerativeModel(nn.Module):
    """Base class of every model. Subclasses set the capabilities that differ and implement `loss` and `sample`.

    Images are (B, C, H, W) floats in [0, 1] in and out; y holds the batch's conditions: class indices (B,), and
    for data that has them multi-hot label vectors (B, K) or layout maps (B, H, W) (see unet.py).
    """

    # Capabilities (class attributes, or set in __init__), read by the scripts:
    condition = None                    # the condition y it takes: "class", "labels", "layout" (unet.CONDITIONS)
                                        # or None; sample(n, generator, labels=y) draws image i for y[i]
    generates = True                    # sample() draws new images (False: an autoencoder stage without a prior)
    reconstructs = False                # reconstruct(x) -> x_hat: reconstruction pictures in visualization.py
    denoises = False                    # denoising_process(...): the x_T ... x_0 picture in visualization.py
    preview = "samples"                 # TensorBoard's picture at each validation: "samples" or "reconstructions"
    selects_by_sample_quality = False   # no meaningful val_loss (a GAN): Best follows FID / FD_eval (--fid-every)
    sample_options = ()                 # keywords of sample() besides labels: e.g. ("sampler", "steps", "guidance")
    lr_scales = {}                      # {parameter group: factor}: its learning rate is --lr times the factor
                                        # (groups not named: 1); e.g. a GAN's two time-scale update rule

    def __init__(self, config, image_shape):
        super().__init__()
        self.config, self.image_shape = config, tuple(image_shape)

    @property
    def conditional(self):
        return self.condition is not None

    # -- required --------------------------------------------------------------------------------------------
    def loss(self, x, y=None, generator=None):
        """{"loss": scalar, other terms...}; training, and validation under no_grad in eval mode with a
        `generator` seeded the same each time, so validation numbers change only with the weights."""
        raise NotImplementedError

    def sample(self, n, generator=None, labels=None, **options):
        """n images (n, C, H, W) in [0, 1], in eval mode; `options` are among `sample_options`."""
        raise NotImplementedError

    # -- optional, with defaults -----------------------------------------------------------------------------
    def reconstruct(self, x):
        raise NotImplementedError(f"{type(self).__name__} does not reconstruct")

    def denoising_process(self, n, generator=None, frames=10, labels=None, **options):
        """(frames, n, C, H, W) in [0, 1]: the sampler's states from pure noise to the sample."""
        raise NotImplementedError(f"{type(self).__name__} has no denoising process")

    def validation_metrics(self, images, labels):
        """Numbers about the whole validation set beyond the mean loss terms, once per validation: {name: float}
        (diffusion: bits per dimension). images: (N, C, H, W) in [0, 1] on the model's device."""
        return {}

    def prepare(self, data, train_images):
        """Called once before the first epoch of a new run (not on --resume): e.g. load a frozen first stage."""

    def parameter_groups(self):
        """{name: module}: one optimiser per group, built from the common flags; frozen parameters are skipped."""
        return {"model": self}

    def train_step(self, x, y, optimizers):
        """One training step on a batch; returns the terms to log (tensors, "loss" among them). The default:
        one optimiser step on `loss`, then the EMA update. A model with several optimisers (a GAN) overrides it;
        it may raise common.TrainingDiverged, which stops the run with status 1 and leaves Best as it was."""
        terms = optimizers.step("model", self.loss, x, y)
        self.update_ema()
        return terms

    # -- shared mechanics ------------------------------------------------------------------------------------
    def check_sampling(self, labels, guidance, guidance_interval=None):
        """Conditions and guidance are for conditional models, and a guidance interval (lo, hi] for guidance with
        0 <= lo < hi: one line naming the fix otherwise."""
        if labels is not None and not self.conditional:
            raise UserError("this model is unconditional (one class, or --unconditional); drop --class-label")
        if guidance != 1 and not self.conditional:
            raise UserError("--guidance needs a conditional model; this one is unconditional")
        if guidance_interval is not None:
            lo, hi = guidance_interval
            if guidance == 1:
                raise UserError("--guidance-interval limits where --guidance applies; pass --guidance W (not 1) too")
            if not 0 <= lo < hi:
                raise UserError(f"--guidance-interval LO HI needs 0 <= LO < HI, got {lo:g} {hi:g}; e.g. 0.28 5.42")

    def init_ema(self, network_name, decay):
        """Keep `self.ema`, an exponential moving average of the sub-network `network_name`, for sampling."""
        self.ema = copy.deepcopy(getattr(self, network_name)).requires_grad_(False)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self._ema_of, self._ema_decay = network_name, decay   # a name, not the module: no second registration

    @torch.no_grad()
    def update_ema(self):
        """ema <- d ema + (1 - d) theta, with the warm-up d = min(decay, (1 + n) / (10 + n)) after n updates so
        the random initial weights are forgotten fast. Float buffers (BatchNorm's statistics) are averaged alike."""
        if not hasattr(self, "_ema_of"):
            return
        n = self.ema_updates.item()
        decay = min(self._ema_decay, (1 + n) / (10 + n))
        online = getattr(self, self._ema_of).state_dict().values()
        pairs = [(e, w) for e, w in zip(self.ema.state_dict().values(), online) if e.is_floating_point()]
        torch._foreach_lerp_([e for e, _ in pairs], [w for _, w in pairs], 1 - decay)
        self.ema_updates += 1


def runs(module, args):
    """The runs a model module trains, in order: its `stages(args)`, or the one run `args`."""
    return module.stages(args) if hasattr(module, "stages") else [args]


class Optimizers:
    """What `train_step` steps with: one optimiser per parameter group, and the mechanics shared by every model.

    `step(name, loss_fn, *batch)` zeroes the group's gradients, runs `loss_fn` on `accumulation` micro-batches
    of `batch` (tensors split along dim 0; None passed as it is), backpropagates each term's share of the batch
    mean, clips the gradient norm (`grad_clip` > 0) and takes one optimiser step. The gradient is that of the
    whole batch: each micro-batch's mean loss is weighted by its share of the batch (exact for losses that are
    means over images). With `precision` bf16 or fp16 the forward pass runs under autocast (fp16 with a
    gradient scaler); the weights, the loss and the optimiser stay fp32. With `distributed`, each group runs
    through PyTorch's DistributedDataParallel, which averages its gradients over the processes; micro-batches but
    the last skip that exchange (no_sync).
    """

    def __init__(self, optimizers, modules, grad_clip=0.0, accumulation=1, precision="fp32", device_type="cpu",
                 distributed=False):
        self.optimizers, self.modules = optimizers, modules
        self.grad_clip, self.accumulation = grad_clip, accumulation
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.device_type = device_type
        self.scaler = torch.amp.GradScaler(device_type) if precision == "fp16" else None
        self.wrappers = {}
        if distributed:
            from torch.nn.parallel import DistributedDataParallel
            self.wrappers = {name: DistributedDataParallel(LossCall(m)) for name, m in modules.items()}

    def __getitem__(self, name):
        return self.optimizers[name]

    def items(self):
        return self.optimizers.items()

    def step(self, name, loss_fn, *batch):
        optimizer, wrapper = self.optimizers[name], self.wrappers.get(name)
        optimizer.zero_grad(set_to_none=True)
        n, k = len(batch[0]), self.accumulation
        chunks = [c for c in zip(*(torch.tensor_split(t, k) if t is not None else [None] * k for t in batch))
                  if len(c[0])]
        totals = {}
        for i, chunk in enumerate(chunks):
            exchange = wrapper is None or i == len(chunks) - 1   # processes average gradients on the last one
            with (nullcontext() if exchange else wrapper.no_sync()), \
                    torch.autocast(self.device_type, self.dtype, enabled=self.dtype is not None):
                terms = wrapper(loss_fn, *chunk) if wrapper is not None else loss_fn(*chunk)
            loss = terms["loss"].float() * (len(chunk[0]) / n)
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + value.detach().float() * (len(chunk[0]) / n)
        if self.scaler:
            self.scaler.unscale_(optimizer)   # clip the true gradient
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(trainable(self.modules[name]), self.grad_clip, foreach=True)
        if self.scaler:
            self.scaler.step(optimizer)       # skipped when the scaled gradient overflowed
            self.scaler.update()
        else:
            optimizer.step()
        return totals


class LossCall(nn.Module):
    """DistributedDataParallel averages the gradients of what its module's forward computes; this forward runs any
    function of the wrapped module (a model's loss), so a model's own loss methods work under it unchanged."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, fn, *args):
        return fn(*args)


def trainable(module):
    """The parameters an optimiser updates: those that require gradients (not EMA copies or frozen stages)."""
    return [p for p in module.parameters() if p.requires_grad]
