"""A tiny, seeded training run launched by tests/test_training.py: killed with SIGKILL and resumed, or run on
several processes under `accelerate launch`. Not a test module itself (pytest only collects test_*.py)."""
import argparse
import time

import torch
from torch import nn

torch.set_num_threads(1)  # two processes share two cores; one thread also keeps the arithmetic identical across runs

from ldm_course.core import make_generator, save_checkpoint  # noqa: E402
from ldm_course.training import TrainConfig, latest_checkpoint  # noqa: E402
from ldm_course.trainer import Trainer


def regression_data(n: int = 320) -> torch.utils.data.TensorDataset:
    "y = x @ W + small noise, with x, W drawn from fixed generators."
    g = make_generator(0)
    x, w = torch.randn(n, 8, generator=g), torch.randn(8, 4, generator=g)
    return torch.utils.data.TensorDataset(x, x @ w + 0.05 * torch.randn(n, 4, generator=g))


def noisy_input_loss(model: nn.Module, batch) -> torch.Tensor:
    "MSE with input noise drawn from the global RNG (like diffusion's ε), so resuming must restore the RNG."
    x, y = batch
    return nn.functional.mse_loss(model(x + 0.1 * torch.randn_like(x)), y)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint_dir")
    parser.add_argument("--final", help="write final weights here ({rank} is replaced by the process index)")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--step-delay", type=float, default=0.0, help="seconds slept after each step")
    parser.add_argument("--expect-processes", type=int, default=1)
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    args = parser.parse_args(argv)

    cfg = TrainConfig(lr=1e-2, warmup_steps=5, max_steps=args.max_steps, batch_size=16, grad_accum=args.grad_accum,
                      clip_grad_norm=1.0, ema_decay=0.9, checkpoint_every=args.checkpoint_every, keep_last=2, seed=0,
                      mixed_precision=args.mixed_precision)
    torch.manual_seed(0)  # model initialisation (a resumed run overwrites it from the checkpoint)
    model = nn.Sequential(nn.Linear(8, 32), nn.SiLU(), nn.Dropout(0.1), nn.Linear(32, 4))
    sleep = lambda trainer: time.sleep(args.step_delay)  # noqa: E731
    trainer = Trainer(model, regression_data(), noisy_input_loss, cfg, args.checkpoint_dir, callbacks=[sleep],
                      device="cpu")
    if trainer.num_processes != args.expect_processes:
        raise SystemExit(f"expected {args.expect_processes} processes, got {trainer.num_processes}")
    start = latest_checkpoint(args.checkpoint_dir)
    print(f"START rank={trainer.accelerator.process_index} from={start.name if start else None}", flush=True)
    history = trainer.fit()
    if args.final:
        rank = trainer.accelerator.process_index
        state = {"model": trainer.unwrapped_model.state_dict(), "ema": trainer.ema_model.state_dict(),
                 "optimizer": trainer.optimizer.state_dict()}
        save_checkpoint(args.final.format(rank=rank), state, {"loss": history.loss, "num_processes": trainer.num_processes})
    print(f"DONE rank={trainer.accelerator.process_index} step={trainer.step} processes={trainer.num_processes} "
          f"first_loss={history.loss[0]:.4f} last_loss={history.loss[-1]:.4f}", flush=True)


if __name__ == "__main__":
    main()
