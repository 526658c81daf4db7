"""RFPO fix stage: fix-prompt templates (rewrite, reward, error_info, reference) and `run_fix_stage`."""
from rfpo_megatron.fix.stage import FixAttempt, FixStageConfig, FixStageResult, run_fix_stage, select_targets
from rfpo_megatron.fix.templates import DEFAULT_TEMPLATES, VARIANTS, render_fix_prompt, resolve_templates

__all__ = ["run_fix_stage", "FixStageConfig", "FixStageResult", "FixAttempt", "select_targets",
           "DEFAULT_TEMPLATES", "VARIANTS", "render_fix_prompt", "resolve_templates"]
