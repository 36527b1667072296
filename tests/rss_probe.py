"""Peak RSS of one extraction in a fresh process: python -m tests.rss_probe PATH DIM"""
import json
import sys

from pipeline import extract_subspace
from pipeline.compute import peak_rss_mib

sub = extract_subspace(sys.argv[1], dim=int(sys.argv[2]))
print(json.dumps({"peak_rss_MiB": peak_rss_mib(),
                  "orthonormality_error": sub.orthonormality_error}))
