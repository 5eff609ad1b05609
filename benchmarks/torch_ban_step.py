"""PyTorch reference: supervised and BAN train steps of ban_tf's nets, on CPU or a GPU.

Not part of ban_tf (torch is not a dependency). Run it from a throwaway venv:

  python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
  /tmp/torchvenv/bin/python benchmarks/torch_ban_step.py --threads=2 --batch_size=128

The default net mirrors ban_tf.models' `preact-resnet-20` (input normalisation, 3x3
stem of 16, 3 stages x 3 pre-activation basic blocks of widths 16/32/64, projection
shortcut on the pre-activated input, final BN-ReLU, global average pool, linear).
`--arch=wrn-28-K` is the same pre-activation net with 4 blocks of widths 16K/32K/64K
(Zagoruyko & Komodakis); `--arch=densenet-D-K` is DenseNet-BC (bottleneck 4K,
compression 0.5, (D - 4) / 6 layers per block). On a GPU (`--device=cuda`):
`--amp=bf16|fp16` (autocast; fp16 with a GradScaler), `--channels_last`, `--compile`
(torch.compile of both steps).
The steps are the usual PyTorch ones: SGD Nesterov with weight decay 5e-4;
supervised = CE on labels; BAN = teacher in eval() under no_grad, student
forward/backward, cross-entropy to the teacher's softmax (T = 1). One fixed batch
in memory, median of repetitions after warm-up, supervised and BAN interleaved.
The last line has the same form as ban_tf.bench's.
"""

import argparse  # noqa: I001
import resource
import statistics
import time

import torch
from torch import nn
import torch.nn.functional as F


class Block(nn.Module):
  """Pre-activation basic block."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.proj = (
      nn.Conv2d(cin, cout, 1, stride, bias=False) if (stride != 1 or cin != cout) else None
    )

  def forward(self, x):
    pre = F.relu(self.bn1(x))
    shortcut = self.proj(pre) if self.proj is not None else x
    y = self.conv2(F.relu(self.bn2(self.conv1(pre))))
    return shortcut + y


class DenseLayer(nn.Module):
  """DenseNet-BC layer: BN-ReLU-1x1 conv (4k) - BN-ReLU-3x3 conv (k), concatenated."""

  def __init__(self, cin, k):
    super().__init__()
    self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 4 * k, 1, bias=False)
    self.bn2, self.conv2 = nn.BatchNorm2d(4 * k), nn.Conv2d(4 * k, k, 3, 1, 1, bias=False)

  def forward(self, x):
    h = self.conv1(F.relu(self.bn1(x)))
    return torch.cat([x, self.conv2(F.relu(self.bn2(h)))], 1)


class DenseNetBC(nn.Module):
  """DenseNet-BC-depth-k for 32x32 inputs: 3 dense blocks, transitions of compression 0.5."""

  def __init__(self, depth=112, k=33, num_classes=10, channels=3):
    super().__init__()
    n = (depth - 4) // 6
    self.register_buffer("mean", torch.full((1, channels, 1, 1), 127.5))
    self.register_buffer("std", torch.full((1, channels, 1, 1), 64.0))
    cin = 2 * k
    self.stem = nn.Conv2d(channels, cin, 3, 1, 1, bias=False)
    layers = []
    for b in range(3):
      for _ in range(n):
        layers.append(DenseLayer(cin, k))
        cin += k
      if b < 2:
        cout = cin // 2
        layers += [
          nn.BatchNorm2d(cin),
          nn.ReLU(),
          nn.Conv2d(cin, cout, 1, bias=False),
          nn.AvgPool2d(2),
        ]
        cin = cout
    self.blocks = nn.Sequential(*layers)
    self.bn = nn.BatchNorm2d(cin)
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = self.stem((x - self.mean) / self.std)
    x = F.relu(self.bn(self.blocks(x)))
    return self.fc(x.mean((2, 3)))


def build(arch):
  """preact-resnet-20 | wrn-D-K | densenet-D-K."""
  if arch == "preact-resnet-20":
    return PreActResNet()
  family, depth, k = arch.rsplit("-", 2)
  depth, k = int(depth), int(k)
  if family == "wrn":
    return PreActResNet(n=(depth - 4) // 6, widths=(16, 16 * k, 32 * k, 64 * k))
  if family == "densenet":
    return DenseNetBC(depth, k)
  raise SystemExit(f"error: --arch={arch!r}: use preact-resnet-20, wrn-D-K or densenet-D-K")


class PreActResNet(nn.Module):
  """Pre-activation ResNet-(6n+2) for 32x32 inputs."""

  def __init__(self, n=3, widths=(16, 16, 32, 64), num_classes=10, channels=3):
    super().__init__()
    self.register_buffer("mean", torch.full((1, channels, 1, 1), 127.5))
    self.register_buffer("std", torch.full((1, channels, 1, 1), 64.0))
    self.stem = nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False)
    layers, cin = [], widths[0]
    for s, w in enumerate(widths[1:]):
      for b in range(n):
        layers.append(Block(cin, w, 2 if (s > 0 and b == 0) else 1))
        cin = w
    self.blocks = nn.Sequential(*layers)
    self.bn = nn.BatchNorm2d(cin)
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = self.stem((x - self.mean) / self.std)
    x = F.relu(self.bn(self.blocks(x)))
    return self.fc(x.mean((2, 3)))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--channels_last", action="store_true")
  p.add_argument("--arch", default="preact-resnet-20")
  p.add_argument("--device", default="cpu", help="cpu or cuda")
  p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
  p.add_argument(
    "--compile", action="store_true", help="torch.compile the forward/backward of each step"
  )
  args = p.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  dev = torch.device(args.device)
  fmt = torch.channels_last if args.channels_last else torch.contiguous_format
  x = (torch.rand(args.batch_size, 3, 32, 32) * 255).to(dev).contiguous(memory_format=fmt)
  y = torch.randint(0, 10, (args.batch_size,)).to(dev)
  teacher = build(args.arch).to(dev).to(memory_format=fmt).eval()
  nets = {
    "supervised": build(args.arch).to(dev).to(memory_format=fmt),
    "distill": build(args.arch).to(dev).to(memory_format=fmt),
  }
  opts = {
    k: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for k, m in nets.items()
  }
  amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
  scaler = torch.amp.GradScaler(dev.type, enabled=args.amp == "fp16")

  def losses(kind):
    net = nets[kind]
    with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
      if kind == "distill":
        with torch.no_grad():
          target = F.softmax(teacher(x).float(), dim=-1)
        return -(target * F.log_softmax(net(x).float(), dim=-1)).sum(-1).mean()
      return F.cross_entropy(net(x).float(), y)

  def forward_backward(kind):
    loss = losses(kind)
    scaler.scale(loss).backward()
    return loss

  if args.compile:
    forward_backward = torch.compile(forward_backward)

  def step(kind):
    net, opt = nets[kind], opts[kind]
    net.train()
    opt.zero_grad(set_to_none=True)
    forward_backward(kind)
    scaler.step(opt)
    scaler.update()

  def sync():
    if dev.type == "cuda":
      torch.cuda.synchronize()

  for kind in nets:
    for _ in range(args.warmup):
      step(kind)
  sync()
  samples = {k: [] for k in nets}
  for _ in range(args.reps):
    for kind in nets:
      t0 = time.perf_counter()
      for _ in range(args.steps):
        step(kind)
      sync()
      samples[kind].append((time.perf_counter() - t0) / args.steps)
  rates = {k: args.batch_size / statistics.median(v) for k, v in samples.items()}
  print(
    f"torch={torch.__version__} arch={args.arch} device={args.device} amp={args.amp} "
    f"compile={args.compile} threads={torch.get_num_threads()} batch_size={args.batch_size} "
    f"channels_last={args.channels_last}"
  )
  for k, v in samples.items():
    print(
      f"{k:>10}: {rates[k]:8.1f} img/s (reps min..max {args.batch_size / max(v):.1f}.."
      f"{args.batch_size / min(v):.1f})"
    )
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
  print(
    f"supervised_img_s={rates['supervised']:.1f} distill_img_s={rates['distill']:.1f} input_img_s=nan "
    f"ratio={rates['supervised'] / rates['distill']:.3f} peak_rss_mb={rss:.1f}"
  )


if __name__ == "__main__":
  main()
