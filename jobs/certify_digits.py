"""The embedded default: certify held-out scikit-learn digits with the bundled demo models.

    python jobs/certify_digits.py --out runs/digits
    ray job submit --working-dir . -- python jobs/certify_digits.py --out s3://bucket/runs/digits

Without a running cluster it starts a local Ray instance by itself. Sized to finish in about
3 minutes on 2 CPU cores; every option of ``densepure certify`` applies (see --help).
"""

import _common  # noqa: F401  (puts the project on sys.path)

from pipeline.cli import certify_main

DEFAULTS = {
    "dataset": "digits",
    "denoiser": "digits",
    "classifier": "digits",
    "methods": "cohen,dds,densepure",
    "sigmas": "0.25,0.5",
    "votes": "1,4",
    "steps": 2,
    "n0": 50,
    "n": 500,
    "alpha": 0.001,
    "max_images": 40,
    "every": 7,
    "chunk": 550,
}

if __name__ == "__main__":
    certify_main(DEFAULTS, prog_name="certify_digits.py")
