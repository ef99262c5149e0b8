"""The deploy-bundle contract (docs/bundle.md), shared by the host that writes bundles (export, the
target families, sweep) and the device that reads them (bench, the benchmark binary).

``format``: file names, schema, towers, runtimes, manifest tables; ``integrity``: the rules a bundle
must pass; ``signing``: Ed25519 signatures of its digest; ``reading``: a verified bundle and its data;
``numerics``: the int8 I/O arithmetic, the static-batch runner and the row cosine both sides apply.
Standard library and numpy only (``cryptography`` only when a key is used): this package sits at the
bottom of the house and ships inside the benchmark binary.
"""
