"""The command line: parse arguments, build a config, call one library function.

A mistake the user can fix (UserError) prints one line and exits with code 2.
"""

import argparse
import json
import signal
import sys
from dataclasses import fields
from pathlib import Path

import zotune
from zotune.config import DEFAULT_RECIPE, RECIPES, TrainConfig, read_json_object
from zotune.errors import UserError

class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error style: one line on stderr and exit code 2, no usage block."""

    def error(self, message):
        command = self.prog.removeprefix("zotune").strip()
        self.exit(2, f"zotune: error: {command + ': ' if command else ''}{message}; see {self.prog} --help\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, Docker, Slurm), raised where the process is: the same exit path as Ctrl-C,
    so a run flushes its logs (train's `finally`) and can be resumed."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _at_least_1(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _train_parser(sub) -> argparse.ArgumentParser:
    """`zotune train`: a flag per TrainConfig field, generated from its declaration."""
    epilog = "recipes: " + "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items())
                                     for name, values in RECIPES.items())
    p = sub.add_parser("train", help="fine-tune with MeZO (or Adam) and report dev/test accuracy",
                       argument_default=argparse.SUPPRESS, epilog=epilog)
    p.add_argument("--recipe", choices=list(RECIPES),
                   help=f"the named preset the run starts from (default: {DEFAULT_RECIPE}, whatever else is given)")
    p.add_argument("--config", help="JSON file of TrainConfig fields over the recipe; flags override it")
    p.add_argument("--resume", metavar="RUN", help="continue the MeZO run in RUN (its config.json); no other flags "
                                                   "but --model, where the run's base checkpoint lies now (a run "
                                                   "moved from another machine; its weights must be the logged ones)")
    for f in fields(TrainConfig):
        if f.name == "recipe":
            continue
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        shown = "from the recipe" if f.default is None and any(f.name in r for r in RECIPES.values()) else f.default
        if f.name in RECIPES[DEFAULT_RECIPE]:
            shown = f"{RECIPES[DEFAULT_RECIPE][f.name]} in {DEFAULT_RECIPE}"
        if f.type is bool and f.default:
            p.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false",
                           help=f"{meta['help']}: turn off")
        elif f.type is bool:
            p.add_argument(flag, action="store_true", help=meta["help"])
        else:
            p.add_argument(flag, type=_field_type(f), choices=meta["choices"], help=f"{meta['help']} (default: {shown})")
    return p


def _field_type(f):
    """The argparse type of a config field: int, float or str (of `X | None`, X)."""
    if f.name == "layers":
        return _layers
    kinds = getattr(f.type, "__args__", (f.type,))
    return next(k for k in kinds if k in (int, float, str))


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(i) for i in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _replay_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("replay", help="rebuild a MeZO run's trainable tensors from the base model and its trajectory log")
    p.add_argument("run", help="run directory holding trajectory.jsonl")
    p.add_argument("--output", required=True, help="directory for trainable.safetensors")
    p.add_argument("--model", help="the base checkpoint, if it moved (its sha256 must match the log's)")
    return p


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """What `eval` and `predict` score with: a checkpoint, its tokenizer and the task's prompt."""
    p.add_argument("--model", default=None, help="checkpoint directory (default: models/zotune-roberta-small)")
    p.add_argument("--tokenizer")
    p.add_argument("--task", default="sst2")


def _eval_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="score a file (or a k-shot test split) with a model: zero-shot or fine-tuned")
    _add_model_options(p)
    p.add_argument("--data", help="a file in the task's format; default: the k-shot test split")
    p.add_argument("--data-dir")
    p.add_argument("--k", type=_at_least_1, default=16)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument("--template")
    p.add_argument("--label-words")
    p.add_argument("--max-length", type=_at_least_1)
    p.add_argument("--batch-size", type=_at_least_1, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--predictions", help="write one JSON line per example here (a generation task: answers, "
                   "prediction, f1, em)")
    p.add_argument("--output", help="write {accuracy, n} here ({f1, em, n} for a generation task)")
    return p


def _export_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="write a run's fine-tuned model as a Hugging Face checkpoint or PEFT adapter")
    p.add_argument("run", help="run directory (a zotune train --output-dir)")
    p.add_argument("--output", required=True, help="new directory to write")
    p.add_argument("--merge-lora", action="store_true",
                   help="LoRA runs: fold the update into the weights and write a full checkpoint, not an adapter")
    p.add_argument("--model", help="where the run's base checkpoint lies now, for a run moved from another machine "
                                   "(default: the one its config.json names)")
    return p


def _predict_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("predict", help="print label-word (a causal LM: candidate) probabilities for texts, "
                                       "or (SQuAD) the generated answer")
    _add_model_options(p)
    p.add_argument("--text", action="append", required=True,
                   help="a sentence (repeat for more); for two-sentence tasks separate them with a tab; for "
                        "a causal LM's SuperGLUE task, a JSON object of the template's fields")
    p.add_argument("--template")
    p.add_argument("--label-words")
    p.add_argument("--max-length", type=_at_least_1)
    p.add_argument("--device", default="auto")
    return p


def _plot_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("plot", help="draw a run's loss, projected gradient and dev accuracy (PNG)")
    p.add_argument("run", help="run directory")
    p.add_argument("--output", help="PNG file (default: RUN/run.png)")
    return p


def _sweep_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("sweep", help="a grid of runs (seeds x lrs x subsets): mean (std) per cell, and the "
                                     "paper's and zotune's aggregates",
                       epilog="Any other flag is passed to every `zotune train` run, e.g. --task sst2 --k 16 --steps 1000.")
    p.add_argument("--output-dir", required=True, help="one folder per run inside, plus results.md and results.json")
    p.add_argument("--seeds", default="13,21,42,87,100", help="data seeds (default: LM-BFF's five)")
    p.add_argument("--lrs", required=True, help="comma-separated learning rates, e.g. 1e-6,1e-7")
    p.add_argument("--trainable", default="full", help="comma-separated subsets, e.g. full,lora,top:4")
    p.add_argument("--devices", default="auto", help="auto (every GPU, else the CPU), cpu, or GPU indices 0,1")
    p.add_argument("--runs-per-device", type=_at_least_1, default=1,
                   help="processes sharing each device at a time (default 1; more keeps a GPU busy with a small model)")
    p.add_argument("--runs-per-process", type=_at_least_1, default=1,
                   help="runs each process trains, a step of each in turn, each on a CUDA stream of its own "
                        "(default 1)")
    p.add_argument("--mps", action="store_true",
                   help="run the processes as clients of a CUDA MPS server of your own, so that the kernels of "
                        "runs sharing a GPU overlap (needs nvidia-cuda-mps-control)")
    return p


def _run_sweep(args, train_args: list[str]) -> None:
    from zotune.grid import local_devices, run_grid
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        lrs = [float(lr) for lr in args.lrs.split(",")]
    except ValueError:
        raise UserError(f"--seeds {args.seeds!r} / --lrs {args.lrs!r}: give comma-separated numbers") from None
    result = run_grid(Path(args.output_dir), seeds, lrs, args.trainable.split(","), train_args,
                      local_devices(args.devices), run_settings, runs_per_device=args.runs_per_device,
                      runs_per_process=args.runs_per_process, mps=args.mps)
    print(result["table"])


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """The recipe (demo unless --recipe names another), then --config, then the flags."""
    values = {}
    if "config" in vars(args):
        values.update(read_json_object(args.config, "give --config a JSON object of config fields"))
    values.update({k: v for k, v in vars(args).items() if k not in ("command", "config", "recipe")})
    return TrainConfig.from_recipe(getattr(args, "recipe", None) or values.pop("recipe", None) or DEFAULT_RECIPE,
                                   values)


def run_settings(flags: list[str]) -> dict:
    """The config `zotune train FLAGS` would run (recipe, --config, flags) as its config.json
    holds it, without running anything: what grid.check_finished holds a finished run to."""
    parser = _Parser(prog="zotune")
    _train_parser(parser.add_subparsers(dest="command"))
    return _train_config(parser.parse_args(["train", *flags])).to_dict()


def _run_train(args) -> None:
    from zotune.train import train
    cfg, resume = _train_request(args)
    print(result_lines(train(cfg, resume)))


def _train_request(args) -> tuple[TrainConfig, bool]:
    """What `zotune train` was asked for: a fresh run's config, or a run to resume."""
    if "resume" not in vars(args):
        return _train_config(args), False
    # The run's own config.json is the whole configuration: a flag could only diverge from it.
    # --model says only where the base checkpoint lies; the trajectory log's sha256 pins which.
    extra = sorted(set(vars(args)) - {"command", "resume", "model"})
    if extra:
        raise UserError(f"--resume takes the config from {args.resume}/config.json; drop --"
                        f"{', --'.join(e.replace('_', '-') for e in extra)}")
    from zotune.trajectory import run_config_here
    cfg = run_config_here(args.resume, getattr(args, "model", None))
    cfg.output_dir = args.resume
    return cfg, True


def _together_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train-together", help="several `zotune train` runs in one process, a step of each in "
                                              "turn (what `sweep --runs-per-process` starts)")
    p.add_argument("jobs", help="a JSON list: per run, the arguments `zotune train` would take")
    return p


def _run_together(args) -> None:
    from zotune.together import RunsFailed, train_together
    jobs = read_json_object(args.jobs, "give a JSON object {\"runs\": [[train arguments], ...]}").get("runs")
    if not isinstance(jobs, list) or not jobs or not all(isinstance(j, list) for j in jobs):
        raise UserError(f"{args.jobs}: \"runs\" must be a non-empty list of argument lists")
    parser = _Parser(prog="zotune")
    _train_parser(parser.add_subparsers(dest="command", required=True))
    requests = [_train_request(parser.parse_args(["train", *map(str, job)])) for job in jobs]
    try:
        summaries = train_together([cfg for cfg, _ in requests], [resume for _, resume in requests])
    except RunsFailed as failed:  # the runs that finished say so too, before the error line
        print("\n".join(result_lines(summary) for summary in failed.summaries if summary is not None))
        raise
    for summary in summaries:
        print(result_lines(summary))


def result_lines(summary: dict) -> str:
    """A finished run in a few lines: zero-shot against fine-tuned accuracy, steps, time, where."""
    zero = summary.get("zero_shot") or {}

    def pair(split):
        before = zero.get(f"{split}_accuracy")
        return (f"{before:.3f} -> " if before is not None else "") + f"{summary[f'{split}_accuracy']:.3f}"
    metric = "" if summary.get("metric", "accuracy") == "accuracy" else f" {summary['metric']}"
    return (f"{summary['optimizer']} {summary['trainable']} on {summary['task']} k={summary['k']} "
            f"seed {summary['seed']}: dev{metric} {pair('dev')}, test{metric} {pair('test')}"
            f"{' (zero-shot -> fine-tuned)' if zero else ''}\n"
            f"{steps_text(summary)} (best dev at step {summary['best_step']}) in {summary['wall_time_s']:.1f} s "
            f"on {summary['device']}; run directory {summary.get('run_dir', '')}")


def steps_text(summary: dict) -> str:
    stopped = summary.get("stopped_early")
    if not stopped:
        return f"{summary['steps']} steps"
    return (f"{stopped['step']} of {summary['steps']} steps, stopped early: {stopped['why']} "
            f"(lower --lr or --eps, or raise --max-loss-ratio or --max-bad-steps)")


def _run_replay(args) -> None:
    from zotune.trajectory import replay_run
    print(json.dumps(replay_run(Path(args.run), Path(args.output), args.model), indent=2))


def _run_eval(args) -> None:
    from zotune.shipped import DEFAULT_MODEL_NAME
    from zotune.evaluate import CausalPrompt, accuracy, build, encode, predict, write_predictions
    from zotune.tasks.data import default_data_dir, load_file, load_split
    prompted = build(args.model or DEFAULT_MODEL_NAME, args.task, tokenizer=args.tokenizer,
                     template=args.template, label_words=args.label_words, max_length=args.max_length,
                     device=args.device)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    if isinstance(prompted.prompt, CausalPrompt):
        if args.data:
            raise UserError("--data reads masked-LM task files; a causal LM reads the task's k-shot split or MeZO "
                            "sample (--split, --k, --seed, --data-dir); drop --data")
        examples = prompted.prompt.examples(args.split, data_dir, args.k, args.seed)
        if prompted.task.generation:
            return _run_generation_eval(args, prompted, examples)
        logits, extra = _candidate_scores(prompted.runner, examples, args.batch_size)
    else:
        examples = load_file(prompted.task, Path(args.data)) if args.data else \
            load_split(prompted.task, data_dir, args.k, args.seed, args.split)
        logits, extra = predict(prompted.runner, encode(prompted.prompt, examples), args.batch_size), None
    result = {"accuracy": accuracy(logits, examples), "n": len(examples)}
    if args.predictions:
        write_predictions(Path(args.predictions), logits, examples, extra)
    _report_eval(args, result)


def _run_generation_eval(args, prompted, examples) -> None:
    """A generation task (SQuAD): greedy answers scored by F1 and EM (evaluate.generation_results)."""
    from zotune.evaluate import generation_results, generation_sums, write_generations
    results = generation_results(prompted.runner, prompted.prompt, examples, args.batch_size)
    result = {**{name: total / len(results) for name, total in generation_sums(results).items()}, "n": len(results)}
    if args.predictions:
        write_generations(Path(args.predictions), results)
    _report_eval(args, result)


def _report_eval(args, result: dict) -> None:
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def _candidate_scores(runner, examples, batch_size: int):
    """A causal LM's scores [N, C] (what it predicts with), and the prediction file's columns:
    each candidate's summed log-probability given its prompt and its token count."""
    from zotune.evaluate import predict_candidates
    sums, tokens = predict_candidates(runner, examples, batch_size)
    scores = sums / tokens if runner.length_normalised else sums
    return scores, {"candidate_logprobs": sums, "candidate_tokens": tokens}


def _run_export(args) -> None:
    from zotune.export import export
    kind = export(args.run, args.output, merge_lora=args.merge_lora, model=args.model)
    print(f"wrote a {'PEFT adapter' if kind == 'peft' else 'Hugging Face checkpoint'} to {args.output}")


def _run_predict(args) -> None:
    from zotune.shipped import DEFAULT_MODEL_NAME
    from zotune.evaluate import CausalPrompt, build, generate_answers
    prompted = build(args.model or DEFAULT_MODEL_NAME, args.task, tokenizer=args.tokenizer,
                     template=args.template, label_words=args.label_words, max_length=args.max_length,
                     device=args.device)
    causal = isinstance(prompted.prompt, CausalPrompt)
    if causal and prompted.task.generation:  # SQuAD: the greedy answer, one line per --text
        for answer in generate_answers(prompted.runner, prompted.prompt,
                                       [prompted.prompt.example_from_text(t) for t in args.text], 64):
            print(answer)
        return
    scored = _causal_predictions if causal else _masked_predictions
    for names, row in scored(prompted, args.text):
        scores = "  ".join(f"{w} {p:.2f}" for w, p in zip(names, row))
        print(f"{scores}  -> {names[max(range(len(row)), key=row.__getitem__)]}")


def _masked_predictions(prompted, texts: list[str]) -> list[tuple[list[str], list[float]]]:
    """Per --text: the label words and their probabilities at the <mask>."""
    import torch
    from zotune.evaluate import predict, text_sentences
    sentences = [text_sentences(text, len(prompted.task.text_columns), prompted.task.name) for text in texts]
    probs = torch.softmax(predict(prompted.runner, [prompted.prompt.encode(s) for s in sentences], 64), -1)  # [N, C]
    tokenizer = prompted.prompt.tokenizer
    words = [tokenizer.convert_tokens_to_string([w]).strip()
             for w in tokenizer.convert_ids_to_tokens(prompted.prompt.label_word_ids)]
    return [(words, row) for row in probs.tolist()]


def _causal_predictions(prompted, texts: list[str]) -> list[tuple[list[str], list[float]]]:
    """Per --text: its candidates (as text) and the softmax of their scores, what a causal LM
    predicts with (CausalRunner.logits)."""
    import torch
    examples = [prompted.prompt.example_from_text(text) for text in texts]
    scores, _ = _candidate_scores(prompted.runner, examples, 64)
    return [(prompted.prompt.candidate_texts(e), row) for e, row in zip(examples, torch.softmax(scores, -1).tolist())]


def _run_plot(args) -> None:
    from zotune.plot import plot_run
    print(f"wrote {plot_run(args.run, args.output)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _Parser(prog="zotune", description=zotune.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _eval_parser(sub)
    _replay_parser(sub)
    _export_parser(sub)
    _predict_parser(sub)
    _plot_parser(sub)
    _sweep_parser(sub)
    _together_parser(sub)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "sweep":  # only a sweep forwards flags (to its runs)
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    previous = None
    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # not if an embedding program has its own
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: signals stay the embedding program's
        pass
    try:
        if args.command == "train":
            _run_train(args)
        elif args.command == "eval":
            _run_eval(args)
        elif args.command == "replay":
            _run_replay(args)
        elif args.command == "export":
            _run_export(args)
        elif args.command == "predict":
            _run_predict(args)
        elif args.command == "plot":
            _run_plot(args)
        elif args.command == "sweep":
            _run_sweep(args, extra)
        elif args.command == "train-together":
            _run_together(args)
    except UserError as exc:
        print(f"zotune: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system's answer (a path that is a file, no permission, a full disk)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"zotune: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("zotune: terminated (SIGTERM); what was computed is on disk", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("zotune: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
