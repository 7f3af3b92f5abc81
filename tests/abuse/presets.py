"""The `tiny` conversion preset of the abuse tests: a 2-layer model converts in a few seconds."""
from __future__ import annotations


def tiny_recipe():
    from converter import block_reconstruction as B
    from converter import pipeline as P
    from converter.admm import AdmmSettings

    return P.Recipe(samples=4, seqlen=10, stat_samples=2, shrinkage=0.4, admm=AdmmSettings(iterations=4),
                    mitigation=B.TuneSettings(epochs=1, batch=2, lr=1e-3), refinement=B.TuneSettings(epochs=1, batch=2),
                    recon_samples=3, recon_epochs=1, recon_batch=2, recon_lr=5e-2, top_k=5, forward_batch=4)


def install_tiny() -> None:
    """Register the preset for good (for a subprocess that runs the command line)."""
    from converter import pipeline as P

    P.PRESETS["tiny"] = tiny_recipe()
