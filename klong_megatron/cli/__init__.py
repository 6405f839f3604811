"""Entry points (``klong-*`` commands). Importing any of them quiets known-harmless third-party warnings
(:mod:`klong_megatron.console`) before megatron-core is imported."""

from klong_megatron.console import quiet_third_party_warnings

quiet_third_party_warnings()
