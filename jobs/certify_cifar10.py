"""CIFAR-10 with the paper protocol (defaults: configs/presets/cifar10.yaml): every 20th test
image (500), n0 = 100, n = 100,000, alpha = 0.001, sigma in {0.25, 0.5, 1.0}, DensePure with
b = 10 steps and K up to 40 votes, improved-diffusion's cifar10_uncond_50M_500K.pt and a ViT-B/16
classifier.

    ray job submit --working-dir . -- python jobs/certify_cifar10.py \\
        --data cifar10:s3://bucket/cifar-10-batches-py/test_batch \\
        --denoiser openai:s3://bucket/models/cifar10_uncond_50M_500K.pt \\
        --classifier hf:s3://bucket/models/vit-base-patch16-224-cifar10 \\
        --out s3://bucket/runs/cifar10 --max-workers 8
"""

import _common  # noqa: F401  (puts the project on sys.path)

from pipeline.cli import certify_main

if __name__ == "__main__":
    certify_main("cifar10", prog_name="certify_cifar10.py")
