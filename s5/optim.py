"""What a recipe trains with: its optimizer, its learning-rate schedule and its loss (the values come checked)."""

import logging

import torch
import torch.nn.functional as F

from s5.config import check_one_cycle

log = logging.getLogger(__name__)
LOSSES = {"nll_loss": F.nll_loss, "cross_entropy": F.cross_entropy}


def get_optimizer(model, recipe):
    """SGD with momentum (and Nesterov), or Adam/AdamW with `momentum` as their first beta."""
    params, lr, decay = model.parameters(), recipe.lr, recipe.weight_decay
    if recipe.optimizer == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=recipe.momentum, weight_decay=decay, nesterov=recipe.nesterov)
    adam = torch.optim.Adam if recipe.optimizer == "Adam" else torch.optim.AdamW
    return adam(params, lr=lr, betas=(recipe.momentum, 0.999), weight_decay=decay)


class LoggedStepLR(torch.optim.lr_scheduler.StepLR):
    """StepLR that logs when it changes the learning rate (torch dropped `verbose=`)."""

    def step(self):
        before = [group["lr"] for group in self.optimizer.param_groups]
        super().step()
        for i, (old, group) in enumerate(zip(before, self.optimizer.param_groups)):
            if group["lr"] != old:
                log.info(f"Adjusting learning rate of group {i} to {group['lr']:.4e}.")


def get_scheduler(optimizer, recipe, total_steps, verbose=False):
    """The recipe's StepLR (stepped once an epoch, logging its drops when `verbose`), or its OneCycleLR over
    `total_steps` batches peaking at the recipe's lr (stepped once a batch), the momentum (beta1) dipping from the
    recipe's by 0.1 as the learning rate rises (torch's default cycle ignored the recipe's momentum)."""
    if recipe.scheduler == "StepLR":
        cls = LoggedStepLR if verbose else torch.optim.lr_scheduler.StepLR
        return cls(optimizer, step_size=recipe.step_size, gamma=recipe.gamma)
    check_one_cycle(total_steps, recipe.pct_start)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=total_steps,
                                               pct_start=recipe.pct_start, max_momentum=recipe.momentum,
                                               base_momentum=max(0.0, recipe.momentum - 0.1))


def steps_per_batch(scheduler):
    """Whether `scheduler` moves the learning rate after every batch (one-cycle) rather than every epoch."""
    return isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)


def get_loss(name="nll_loss", label_smoothing=0.0):
    """The loss by name; with `label_smoothing` > 0, cross-entropy against smoothed targets, in fp32 (the Net's
    log-probabilities are their own log-softmax, so this is the smoothed NLL)."""
    if not label_smoothing:
        return LOSSES[name]

    def smoothed(log_probs, target):
        return F.cross_entropy(log_probs.float(), target, label_smoothing=label_smoothing)
    return smoothed


def build_training(model, recipe, steps_per_epoch, verbose=False):
    """Optimizer, scheduler and training loss for `recipe`, in one call."""
    optimizer = get_optimizer(model, recipe)
    scheduler = get_scheduler(optimizer, recipe, recipe.epochs * steps_per_epoch, verbose)
    return optimizer, scheduler, get_loss("nll_loss", recipe.label_smoothing)
