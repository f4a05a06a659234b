"""Several machines: ``--llamabench-shard=i/N`` runs a stable share of the configs on each
host (``spec``), and ``python -m pytest_llamabench merge`` joins their reports into one
(``merge``, ``cli``) for the table and the regression gate."""
