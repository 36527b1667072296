"""Runs one experiment configuration in a subprocess for the kill -9 tests.

usage: python -m tests.run_proc DIR [--resume]
"""
import sys

from pipeline.experiments.runner import Run, RunConfig

CONFIG = RunConfig(recipe="digits-mlp", sample_epochs=6, dim=4, subspace_epochs=4, optimizer="pbfgs",
                   bfgs_batch_size=256, baselines=["psgd", "sgd"], seed=3)

if __name__ == "__main__":
    Run(sys.argv[1], CONFIG, log=lambda s: print(s, flush=True)).execute(resume="--resume" in sys.argv)
    print("finished", flush=True)
