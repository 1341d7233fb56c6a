"""sb-eval inside lm-evaluation-harness: the `sb_hf` model (stick_breaking_lm), the engine of
length sweeps (sweep), and every use of lm-eval's private names (lm_eval_compat). The start-up
hook that registers `sb_hf` with the stock `lm_eval` command is plugin/sb_eval_hook.py."""
