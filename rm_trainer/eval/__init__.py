"""Judging a reward model: diagnostics (length bias, calibration, margins), RewardBench v1/v2 scoring
(rewardbench), rm-eval's file reader and scorer (files), and the report with its pictures (report)."""
