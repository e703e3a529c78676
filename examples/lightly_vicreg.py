#!/usr/bin/env python
"""lightly's VICReg example (plain PyTorch loop) training STAR's joint objective.

Start from lightly's ``examples/pytorch/vicreg.py``; the lines marked ``# STAR`` are the change (see
docs/integrations.md). The dataset yields un-augmented images; ``STARAugment`` (kornia) draws both views and
their 11-D parameters on the device. lightly's ``VICRegLoss`` stays the invariant loss; ``VICRegAdapter`` adds
the STAR head, the equivariant predictor and a VICReg-style equivariant loss (STAR, arXiv 2510.27222, Sec. 3).

    python examples/lightly_vicreg.py                     # embedded shapes data, CPU, seconds
    python examples/lightly_vicreg.py --data cifar10 --epochs 10 --batch-size 256 --steps 0

Needs ``pip install lightly kornia`` (lightly brings torchvision).
"""

import argparse

import torch
import torchvision
from lightly.loss import VICRegLoss
from torch import nn

from star_heads import STARAugment, VICRegAdapter  # STAR
from star_heads.data import make_shapes


class VICReg(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.adapter = VICRegAdapter(512, loss=VICRegLoss())  # STAR: head + predictor + both losses

    def forward(self, x):
        return self.backbone(x).flatten(start_dim=1)  # STAR: features; the adapter owns the head


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--data", choices=["shapes", "cifar10"], default="shapes")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="stop after this many steps (0 = whole epochs)")
    args = p.parse_args(argv)

    resnet = torchvision.models.resnet18()
    resnet.fc = nn.Identity()
    model = VICReg(resnet)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)

    augment = STARAugment(32)  # STAR: views + their 11-D parameters, on the device
    if args.data == "cifar10":  # STAR: un-augmented images (ToTensor instead of VICRegTransform)
        dataset = torchvision.datasets.CIFAR10("datasets/cifar10", download=True, transform=torchvision.transforms.ToTensor())
    else:
        dataset = make_shapes(64, image_size=32).as_dataset()
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.06)

    print("Starting Training")
    step = 0
    for epoch in range(args.epochs):
        total_loss = 0
        for batch in dataloader:
            x = batch[0].to(device)
            (x1, p1), (x2, p2) = augment(x), augment(x)  # STAR
            h0, h1, h2 = model(augment.original(x)), model(x1), model(x2)  # STAR
            out = model.adapter(h1, h2, h0=h0, params1=p1, params2=p2)  # STAR: L_inv + λ·L_eq
            loss = out.loss
            total_loss += loss.detach()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in out.as_dict(routing=False).items()))
            if step == args.steps:
                return model
        avg_loss = total_loss / len(dataloader)
        print(f"epoch: {epoch:>02}, loss: {avg_loss:.5f}")
    return model


if __name__ == "__main__":
    main()
