"""The names of what a run writes in its output directory, in one place."""

RUN_FILE = "run.json"  # the run's record: configuration, status, resolved settings, versions
METRICS_FILE = "metrics.jsonl"  # one line per logged step and evaluation
PREFIX = "checkpoint-"  # checkpoint-N/: the model and everything an exact resume needs
FINAL = "final"  # final/: the trained model, a Hugging Face directory
BEST = "best"  # best/: the best evaluation's weights, when a stopping policy keeps them
BEST_RECORD = "dpo_best.json"  # in best/: the step and the evaluation that made it best
MERGED = "merged"  # merged/: with --lora --merge, the adapter merged into its base model
SAMPLES_FILE = "samples.jsonl"  # with --sample-prompts: the policy's generations at each evaluation
