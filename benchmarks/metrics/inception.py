"""InceptionV3 for FID: the network up to its global average pool (pool3, 2048-d), in the variant of the
TensorFlow FID graph that the pytorch-fid weights expect, or torchvision's."""

from __future__ import annotations


def _inception_modules():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Conv(nn.Module):
        def __init__(self, cin, cout, **kw):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
            self.bn = nn.BatchNorm2d(cout, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    def avg3(x, tf_pool: bool):
        # the TensorFlow graph FID was defined with averages over the valid (unpadded) pixels only
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=not tf_pool)

    class A(nn.Module):
        def __init__(self, cin, pool, tf_pool):
            super().__init__()
            self.tf_pool = tf_pool
            self.branch1x1 = Conv(cin, 64, kernel_size=1)
            self.branch5x5_1 = Conv(cin, 48, kernel_size=1)
            self.branch5x5_2 = Conv(48, 64, kernel_size=5, padding=2)
            self.branch3x3dbl_1 = Conv(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = Conv(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = Conv(96, 96, kernel_size=3, padding=1)
            self.branch_pool = Conv(cin, pool, kernel_size=1)

        def forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg3(x, self.tf_pool))], 1)

    class B(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3 = Conv(cin, 384, kernel_size=3, stride=2)
            self.branch3x3dbl_1 = Conv(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = Conv(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = Conv(96, 96, kernel_size=3, stride=2)

        def forward(self, x):
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)

    class C(nn.Module):
        def __init__(self, cin, c7, tf_pool):
            super().__init__()
            self.tf_pool = tf_pool
            self.branch1x1 = Conv(cin, 192, kernel_size=1)
            self.branch7x7_1 = Conv(cin, c7, kernel_size=1)
            self.branch7x7_2 = Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7_3 = Conv(c7, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_1 = Conv(cin, c7, kernel_size=1)
            self.branch7x7dbl_2 = Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_3 = Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7dbl_4 = Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_5 = Conv(c7, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch_pool = Conv(cin, 192, kernel_size=1)

        def forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = x
            for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                          self.branch7x7dbl_5):
                d = layer(d)
            return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(avg3(x, self.tf_pool))], 1)

    class D(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3_1 = Conv(cin, 192, kernel_size=1)
            self.branch3x3_2 = Conv(192, 320, kernel_size=3, stride=2)
            self.branch7x7x3_1 = Conv(cin, 192, kernel_size=1)
            self.branch7x7x3_2 = Conv(192, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7x3_3 = Conv(192, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7x3_4 = Conv(192, 192, kernel_size=3, stride=2)

        def forward(self, x):
            b3 = self.branch3x3_2(self.branch3x3_1(x))
            b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
            return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)

    class E(nn.Module):
        def __init__(self, cin, pool_mode):
            super().__init__()
            self.pool_mode = pool_mode  # "avg" (torchvision), "avg_tf" (FID Mixed_7b) or "max" (FID Mixed_7c)
            self.branch1x1 = Conv(cin, 320, kernel_size=1)
            self.branch3x3_1 = Conv(cin, 384, kernel_size=1)
            self.branch3x3_2a = Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3_2b = Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = Conv(cin, 448, kernel_size=1)
            self.branch3x3dbl_2 = Conv(448, 384, kernel_size=3, padding=1)
            self.branch3x3dbl_3a = Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch_pool = Conv(cin, 192, kernel_size=1)

        def forward(self, x):
            s = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], 1)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
            if self.pool_mode == "max":
                p = F.max_pool2d(x, 3, stride=1, padding=1)
            else:
                p = avg3(x, self.pool_mode == "avg_tf")
            return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(p)], 1)

    class InceptionV3Features(nn.Module):
        """InceptionV3 up to the global average pool: [N, 3, H, W] in [0, 1] -> [N, 2048].

        ``fid=True`` builds the variant of the TensorFlow FID graph (average pools over valid pixels only, a max
        pool in the last block), which the pytorch-fid weights expect; ``fid=False`` is torchvision's network.
        """

        def __init__(self, fid: bool = True):
            super().__init__()
            self.fid = fid
            self.Conv2d_1a_3x3 = Conv(3, 32, kernel_size=3, stride=2)
            self.Conv2d_2a_3x3 = Conv(32, 32, kernel_size=3)
            self.Conv2d_2b_3x3 = Conv(32, 64, kernel_size=3, padding=1)
            self.Conv2d_3b_1x1 = Conv(64, 80, kernel_size=1)
            self.Conv2d_4a_3x3 = Conv(80, 192, kernel_size=3)
            self.Mixed_5b = A(192, 32, fid)
            self.Mixed_5c = A(256, 64, fid)
            self.Mixed_5d = A(288, 64, fid)
            self.Mixed_6a = B(288)
            self.Mixed_6b = C(768, 128, fid)
            self.Mixed_6c = C(768, 160, fid)
            self.Mixed_6d = C(768, 160, fid)
            self.Mixed_6e = C(768, 192, fid)
            self.Mixed_7a = D(768)
            self.Mixed_7b = E(1280, "avg_tf" if fid else "avg")
            self.Mixed_7c = E(2048, "max" if fid else "avg")

        def forward(self, x):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = 2 * x - 1
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = F.max_pool2d(x, 3, stride=2)
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
            x = F.max_pool2d(x, 3, stride=2)
            for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                         "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
                x = getattr(self, name)(x)
            return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    return InceptionV3Features


def build_inception(fid: bool = True):
    return _inception_modules()(fid=fid)

