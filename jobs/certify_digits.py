"""The embedded default: certify held-out scikit-learn digits with the bundled demo models.

    python jobs/certify_digits.py --out runs/digits
    ray job submit --working-dir . -- python jobs/certify_digits.py --out s3://bucket/runs/digits

Without a running cluster it starts a local Ray instance by itself. Sized to finish in about
3 minutes on 2 CPU cores; its defaults are configs/presets/digits.yaml, and every option of
``densepure certify`` applies (see --help).
"""

import _common  # noqa: F401  (puts the project on sys.path)

from pipeline.cli import certify_main

if __name__ == "__main__":
    certify_main("digits", prog_name="certify_digits.py")
