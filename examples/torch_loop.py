"""A PyTorch CPU training loop that clips with clipcore.torch.clip_grad_norm_.

    python examples/torch_loop.py [--epochs 4] [--max-norm 1.0] [--lr 0.2]

``clipcore.torch.clip_grad_norm_`` is a drop-in for
``torch.nn.utils.clip_grad_norm_``: same arguments, same returned 0-d tensor,
same clipping coefficient; CPU float32/float64 gradients are read and scaled
in place by clipcore's fused kernels. The loop checks once, on the first
step, that it computes the same norm as torch's own function.

The data are synthetic (10 Gaussian classes in 784 dimensions, no download);
the model is the lesson's 784-256-128-10 MLP, trained with plain SGD.
"""
import argparse
import time

import torch

import clipcore.torch


def make_data(n_train, n_test, dim=784, classes=10, seed=0):
    """Noisy samples around one random center per class: (x, y) for training and testing."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=gen)
    y = torch.randint(0, classes, (n_train + n_test,), generator=gen)
    x = centers[y] + 5.0 * torch.randn(len(y), dim, generator=gen)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--max-norm", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    (x, y), (x_test, y_test) = make_data(4000, 1000)
    model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    loss_fn = torch.nn.CrossEntropyLoss()

    def accuracy(xs, ys):
        with torch.no_grad():
            return (model(xs).argmax(dim=1) == ys).float().mean().item()

    norms, steps, clipped, first_loss = [], 0, 0, None
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(y))
        losses = []
        for start in range(0, len(y), args.batch):
            idx = order[start:start + args.batch]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            if steps == 0:
                theirs = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
            total_norm = clipcore.torch.clip_grad_norm_(model.parameters(), args.max_norm)
            if steps == 0:
                print(f"first step: clipcore norm {total_norm.item():.6f}, "
                      f"torch norm {theirs.item():.6f}, dtype {total_norm.dtype}")
                after = clipcore.torch.get_total_norm([p.grad for p in model.parameters()])
                print(f"first step: norm after clipping {after.item():.6f}")
            opt.step()
            norms.append(total_norm.item())
            clipped += total_norm.item() > args.max_norm
            steps += 1
            losses.append(loss.item())
        first_loss = first_loss if first_loss is not None else losses[0]
        print(f"epoch {epoch}: mean loss {sum(losses) / len(losses):.4f}, "
              f"test accuracy {accuracy(x_test, y_test):.3f}")
    elapsed = time.perf_counter() - t0

    with torch.no_grad():
        final_loss = loss_fn(model(x), y).item()
    norms.sort()
    print(f"first batch loss {first_loss:.4f}, final training loss {final_loss:.4f}")
    print(f"final test accuracy {accuracy(x_test, y_test):.3f}")
    print(f"clipped {clipped} of {steps} steps")
    print(f"global norm before clipping: median {norms[len(norms) // 2]:.4f}, "
          f"max {norms[-1]:.4f}")
    print(f"trained in {elapsed:.2f} s")


if __name__ == "__main__":
    main()
