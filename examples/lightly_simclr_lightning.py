#!/usr/bin/env python
"""lightly's SimCLR example (LightningModule form) training STAR's joint objective.

Start from lightly's ``examples/pytorch_lightning/simclr.py``; the lines marked ``# STAR`` are the change (see
docs/integrations.md). ``STARAugment`` draws both views and their 11-D parameters on the module's device inside
``training_step``; ``out.as_dict()`` logs every loss term and the routing through ``self.log_dict``, and
``STARLoggingCallback`` adds CCA(inv, eq) with its null baseline.

    python examples/lightly_simclr_lightning.py           # embedded shapes data, CPU, seconds
    python examples/lightly_simclr_lightning.py --data cifar10 --epochs 10 --batch-size 256 --steps -1

Needs ``pip install lightly kornia pytorch-lightning``.
"""

import argparse

import pytorch_lightning as pl
import torch
import torchvision
from lightly.loss import NTXentLoss
from torch import nn

from star_heads import SimCLRAdapter, STARAugment  # STAR
from star_heads.data import make_shapes
from star_heads.integrations.lightning import STARLoggingCallback  # STAR


class SimCLR(pl.LightningModule):
    def __init__(self):
        super().__init__()
        resnet = torchvision.models.resnet18()
        resnet.fc = nn.Identity()
        self.backbone = resnet
        self.adapter = SimCLRAdapter(512, loss=NTXentLoss())  # STAR: head + predictor + both losses
        self.augment = STARAugment(32)  # STAR: views + their 11-D parameters, on the device

    def forward(self, x):
        return self.backbone(x).flatten(start_dim=1)  # STAR: features; the adapter owns the head

    def training_step(self, batch, batch_index):
        x = batch[0]
        (x1, p1), (x2, p2) = self.augment(x), self.augment(x)  # STAR
        h0, h1, h2 = self(self.augment.original(x)), self(x1), self(x2)  # STAR
        out = self.adapter(h1, h2, h0=h0, params1=p1, params2=p2)  # STAR: L_inv + λ·L_eq
        self.log_dict(out.as_dict("train/", routing=False))  # STAR
        return out.loss

    def configure_optimizers(self):
        optim = torch.optim.SGD(self.parameters(), lr=0.06)
        return optim


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--data", choices=["shapes", "cifar10"], default="shapes")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="stop after this many steps (-1 = whole epochs)")
    args = p.parse_args(argv)

    model = SimCLR()
    if args.data == "cifar10":  # STAR: un-augmented images (ToTensor instead of SimCLRTransform)
        dataset = torchvision.datasets.CIFAR10("datasets/cifar10", download=True, transform=torchvision.transforms.ToTensor())
    else:
        dataset = make_shapes(64, image_size=32).as_dataset()
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)

    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    trainer = pl.Trainer(
        max_epochs=args.epochs, max_steps=args.steps, devices=1, accelerator=accelerator,
        callbacks=[STARLoggingCallback(every=1)],  # STAR: routing + CCA(inv, eq) and its null
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
    )
    trainer.fit(model=model, train_dataloaders=dataloader)
    return model, trainer


if __name__ == "__main__":
    main()
