"""ImageNet with the paper protocol (ALGORITHM.md section 5): every 500th validation image (100),
n0 = 100, n = 10,000, alpha = 0.001, sigma in {0.25, 0.5, 1.0}, DensePure with b = 10 steps and
K up to 40 votes, guided-diffusion's 256x256_diffusion_uncond.pt and BEiT-large/16 at 512.

    ray up cluster.yaml
    ray job submit --working-dir . -- python jobs/certify_imagenet.py \\
        --data imagenet:s3://bucket/imagenet/val \\
        --denoiser openai:s3://bucket/models/256x256_diffusion_uncond.pt \\
        --classifier hf:s3://bucket/models/beit-large-patch16-512 \\
        --out s3://bucket/runs/imagenet-sigma05 --sigmas 0.5 --max-workers 16
"""

import _common

from pipeline.cli import certify_main

DEFAULTS = {
    "dataset": "",  # required: --data imagenet:DIR (synset folders, local or s3://)
    "denoiser": "",  # required: --denoiser openai:PATH/256x256_diffusion_uncond.pt
    "classifier": "",  # required: --classifier hf:DIR
    "model_flags": str(_common.CONFIGS / "imagenet_256x256_diffusion_uncond.flags.json"),
    "methods": "cohen,dds,densepure",
    "sigmas": "0.25,0.5,1.0",
    "votes": "1,5,10,20,40",
    "steps": 10,
    "n0": 100,
    "n": 10_000,
    "alpha": 0.001,
    "every": 500,
    "chunk": 500,
}

if __name__ == "__main__":
    certify_main(DEFAULTS, prog_name="certify_imagenet.py")
