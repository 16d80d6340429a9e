"""Learning studies (CLIs over the library): `shift_bench` (two topics, tau before/after the
shift per updater) and `stream_study` (a long shift stream, per-visit tau, update share)."""
