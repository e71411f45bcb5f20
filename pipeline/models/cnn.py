import torch.nn as nn


class SimpleCNN(nn.Module):
    """The seed experiment's CNN: conv 1→16 → ReLU → conv 16→32 → ReLU → flatten → linear → 10.

    3,976,448 MACs at 28×28. No pooling, so the classifier's input is channels × H × W and pruning
    conv2's output channels shrinks the classifier too.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                 channels: tuple[int, int] = (16, 32)):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
        )
        self.classifier = nn.Linear(c2 * image_size * image_size, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))
