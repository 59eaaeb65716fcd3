"""Patch-trigger backdoor attacks on self-supervised learning: poisoned data, its manifest,
and the backdoor evaluation (docs/backdoor.md).

Reusable entry points: :func:`~ssl_lib.backdoor.manifest.load_manifest` (a
:class:`~ssl_lib.backdoor.manifest.Manifest` with ``train`` / ``val`` records and ``target``),
:func:`~ssl_lib.backdoor.manifest.check_data`,
:class:`~ssl_lib.backdoor.poison.PoisonedDataset`, the metric functions of
:mod:`ssl_lib.backdoor.metrics` (the one attack success rate), and the probe file format
(:func:`~ssl_lib.backdoor.evaluate.save_probe` / :func:`~ssl_lib.backdoor.evaluate.load_probe`,
also used by ``ssl-lib defend block``).
"""
