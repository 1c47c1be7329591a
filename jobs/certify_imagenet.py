"""ImageNet with the paper protocol (defaults: configs/presets/imagenet.yaml): every 500th
validation image (100), n0 = 100, n = 10,000, alpha = 0.001, sigma in {0.25, 0.5, 1.0}, DensePure
with b = 10 steps and K up to 40 votes, guided-diffusion's 256x256_diffusion_uncond.pt and
BEiT-large/16 at 512.

    ray up cluster.yaml
    ray job submit --working-dir . -- python jobs/certify_imagenet.py \\
        --data imagenet:s3://bucket/imagenet/val \\
        --denoiser openai:s3://bucket/models/256x256_diffusion_uncond.pt \\
        --classifier hf:s3://bucket/models/beit-large-patch16-512 \\
        --out s3://bucket/runs/imagenet-sigma05 --sigmas 0.5 --max-workers 16
"""

import _common  # noqa: F401  (puts the project on sys.path)

from pipeline.cli import certify_main

if __name__ == "__main__":
    certify_main("imagenet", prog_name="certify_imagenet.py")
