"""
Distil a trained model (the teacher) into a consistency model of the same
architecture (the student) that translates in 1 to 4 network calls:
consistency distillation in the teacher's own schedule (guided_diffusion/distillation.py).

One process (CPU or one GPU), no launcher needed:
    python scripts/image_distill.py --teacher_path RUN/ema_0.9999_100000.pt \
        --data_dir_sar DATA/sar --data_dir_opt DATA/opt --max_steps 20000
Several GPUs on one machine (either launcher):
    mpiexec -n 4 python scripts/image_distill.py ...
    torchrun --nproc_per_node 4 scripts/image_distill.py ...

The teacher's config.json gives the architecture, the schedule, the prediction
target and the input scaling; the student starts from its weights. The data flags
are image_train.py's, on data of the teacher's kind. The run folder is a training
run's ($OPENAI_LOGDIR, else ./logs/<date>_<time>; --resume_checkpoint auto
continues), and its config.json adds a "distillation" record, which makes the
sampling scripts and the page sample it with --sampler consistency. With
--val_data_dir, every --val_interval steps the target network translates the
validation pairs at 1, 2 and 4 steps: val_NNNNNN_<n>step.png and val_ssim_<n>step,
val_psnr_<n>step in progress.csv.
"""

import argparse
import os
import sys

import torch as th

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import dist_util, logger  # noqa: E402
from guided_diffusion.base import settings  # noqa: E402
from guided_diffusion.base.atomic import DiskFull  # noqa: E402
from guided_diffusion.distillation import (  # noqa: E402
    DistillationLoop,
    distillation_defaults,
)
from guided_diffusion.evaluation.validation import (  # noqa: E402
    Validator,
    built_on_main_process,
)
from guided_diffusion.image_datasets import DataError, find_pairs, load_data  # noqa: E402
from guided_diffusion.io.checkpoints import (  # noqa: E402
    latest_run_dir,
    load_state_dict,
    read_run_config,
    remove_stale_temp_files,
    write_config,
)
from guided_diffusion.io.rasters import resolve  # noqa: E402
from guided_diffusion.script_util import (  # noqa: E402
    check_state_dict_fits,
    create_gaussian_diffusion,
    create_model_and_diffusion,
    diffusion_defaults,
    prediction_target,
)
from guided_diffusion.train_util import TRAINING_GROUPS, check_precision  # noqa: E402
from guided_diffusion.translation.sampling import (  # noqa: E402
    add_model_flags,
    explicit_model_flags,
    input_scaling,
    resolve_model_flags,
    student_model,
)

# image_train.py's flags but three: the timesteps are the skip grid's (no
# --schedule_sampler), validation samples the student with its own sampler at
# VAL_STEPS (no --val_sampler, --val_timestep_respacing).
LOOP_FLAGS = [
    n for n in settings.names(*TRAINING_GROUPS)
    if n not in ("schedule_sampler", "val_sampler", "val_timestep_respacing")
]  # fmt: skip
# The student's numbers of steps that validation translates with, one grid each.
VAL_STEPS = (1, 2, 4)


def main():
    args = create_argparser().parse_args()
    teacher_path, teacher_config, teacher_state = read_teacher(args.teacher_path)
    flags, conflicts = resolve_model_flags(explicit_model_flags(args), teacher_config)
    if conflicts:
        given = ", ".join(f"--{k} {v}" for k, (v, _) in conflicts.items())
        trained = " ".join(f"--{k} {w}" for k, (_, w) in conflicts.items())
        raise ValueError(
            f"{given} would change the teacher's model (its config.json has {trained}): "
            "the student is the teacher's architecture on the teacher's data; leave them out"
        )
    flags["timestep_respacing"] = ""  # the teacher's own schedule
    given_inputs = settings.values(args, "inputs")
    scaling, conflicts = input_scaling(teacher_config, given_inputs, flags["sar_channels"])
    if conflicts:
        given = ", ".join(f"--{k} {v}" for k, (v, _) in conflicts.items())
        raise ValueError(
            f"{given} disagrees with the inputs the teacher learned on (its config.json's "
            "\"inputs\"): leave it out, or distil a teacher trained on such data"
        )
    for flag in ("data_dir_sar", "data_dir_opt"):
        if not getattr(args, flag):
            raise ValueError(
                f"--{flag} is required: the folder of the {flag[-3:].upper()} training images"
            )
    check_precision(flags["use_fp16"], args.use_bf16)

    dist_util.setup_dist()

    # -- teacher, student (its copy) and target network (the EMA's copy) ------------
    nets = []
    for use_fp16 in (flags["use_fp16"], False, False):
        net, diffusion = create_model_and_diffusion(**{**flags, "use_fp16": use_fp16})
        check_state_dict_fits(net.state_dict(), teacher_state, teacher_path)
        net.load_state_dict(teacher_state)
        nets.append(net)
    student, teacher, target = nets
    teacher.to(dist_util.dev())

    # the first pair fixes the band names and dB ranges, checked against the teacher's
    notes = []
    pairs = find_pairs(args.data_dir_sar, args.data_dir_opt, notes)
    scaling, facts = resolve(scaling, pairs[0][0], pairs[0][1])

    def data(start_batch):
        return load_data(
            data_dir_sar=args.data_dir_sar, data_dir_opt=args.data_dir_opt,
            batch_size=args.batch_size, image_size=flags["image_size"],
            random_crop=args.random_crop, random_flip=args.random_flip, scaling=scaling,
            seed=args.seed, start_batch=start_batch,
            num_workers=None if args.num_workers < 0 else args.num_workers, pairs=pairs,
        )  # fmt: skip

    # None on ranks > 0, which do not validate
    validator = None
    if args.val_data_dir:
        validator = built_on_main_process(lambda: build_validator(args, flags, scaling))

    # -- the run folder --------------------------------------------------------------
    run_dir = None
    if args.resume_checkpoint == "auto" and not os.environ.get("OPENAI_LOGDIR"):
        run_dir = latest_run_dir("logs") if dist_util.is_main_process() else None
    logger.configure(dir=run_dir, append=bool(args.resume_checkpoint))
    method = {k: getattr(args, k) for k in distillation_defaults()}
    loop = DistillationLoop(
        model=student, diffusion=diffusion, teacher=teacher, target=target, data=data,
        validator=validator,
        mean_type=prediction_target(flags["predict"], flags["predict_xstart"]),
        **{k: v for k, v in method.items() if k != "teacher_path"},
        **{k: getattr(args, k) for k in LOOP_FLAGS}, **flags,
    )  # fmt: skip
    if dist_util.is_main_process():
        remove_stale_temp_files(logger.get_dir())
        config = {
            **teacher_config,
            **flags,
            **{k: getattr(args, k) for k in LOOP_FLAGS},
            "ema_rate": loop.cfg.ema_rate,
            "inputs": {**scaling.record(), **facts},
            "distillation": {
                "method": "consistency", "teacher": teacher_path, "skip": args.skip,
                "distance": args.distance, "huber_c": loop.huber_c,
                "target_ema": args.target_ema, "adv_weight": args.adv_weight, "solver": "ddim",
                "seed": args.seed,
            },
            "world_size": dist_util.get_world_size(),
            "torch": th.__version__,
        }  # fmt: skip
        logger.log(f"configuration written to {write_config(config, logger.get_dir())}")
        for note in dist_util.setup_notes() + notes:
            logger.log(note)

    # -- distil ----------------------------------------------------------------------
    stop = f"stops at step {args.max_steps}" if args.max_steps else "runs until stopped"
    logger.log(
        f"distilling {teacher_path} on {dist_util.get_world_size()} process(es), global batch "
        f"{loop.global_batch}, from step {loop.step}; {stop}; checkpoints every "
        f"{args.save_interval} steps in {logger.get_dir()}"
    )
    loop.run_loop()
    logger.log(f"done at step {loop.step}; checkpoints are in {logger.get_dir()}")
    dist_util.cleanup()


class StudentValidator:
    """
    Validation of the student at each of :data:`VAL_STEPS` with the target
    network's weights (the first EMA, which TrainLoop hands over):
    val_NNNNNN_<n>step.png and the scores with the suffix _<n>step.
    """

    def __init__(self, validators):
        self.validators = validators

    def __call__(self, state_dict, step, folder):
        scores = {}
        for validator in self.validators.values():
            scores.update(validator(state_dict, step, folder))
        return scores


def build_validator(args, flags, scaling):
    """
    The student's validation at each of :data:`VAL_STEPS`: one float32 copy of the
    network read as a consistency model, and a respaced diffusion per step count.
    """
    net, _ = create_model_and_diffusion(**{**flags, "use_fp16": False})
    model = student_model(net, flags).to(dist_util.dev())
    validators = {}
    for n in VAL_STEPS:
        diffusion = create_gaussian_diffusion(
            steps=flags["diffusion_steps"], timestep_respacing=f"trailing{n}",
            **{k: flags[k] for k in diffusion_defaults() if k not in (
                "diffusion_steps", "timestep_respacing")},
        )  # fmt: skip
        validators[n] = Validator(
            model=model, diffusion=diffusion, data_dir=args.val_data_dir,
            image_size=flags["image_size"], scaling=scaling, num=args.val_num,
            sampler="consistency", seed=args.seed, label=f"_{n}step",
        )  # fmt: skip
    return StudentValidator(validators)


def read_teacher(path):
    """
    The teacher's absolute path, its run's record and its weights.

    :raises ValueError: one line, for a path that is no checkpoint of a training run.
    """
    if not path:
        raise ValueError("--teacher_path is required: a model or EMA file of a training run")
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"--teacher_path {path}: no such file; give a model or EMA file")
    config = read_run_config(path)
    if config is None:
        raise ValueError(
            f"--teacher_path {path}: no config.json beside it; distil a checkpoint of a "
            "training run of this project (its config.json gives the model)"
        )
    if "distillation" in config:  # a student's record
        raise ValueError(
            f"--teacher_path {path} is a distilled student: give its teacher, a diffusion model"
        )
    try:
        state = load_state_dict(path)
    except ValueError as err:  # the file is no state dict: its one line
        raise ValueError(f"--teacher_path: {err}") from None
    except Exception as err:  # what torch.load raises for a file it cannot read varies
        raise ValueError(
            f"--teacher_path {path} is not a checkpoint ({type(err).__name__}); give a "
            "model or EMA file (model010000.pt, ema_0.9999_010000.pt)"
        ) from None
    return path, config, state


def create_argparser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, (default, help) in distillation_defaults().items():
        kind = settings.Setting(name, default, help, "distillation")
        parser.add_argument(
            f"--{name}", default=default, type=kind.parse, help=f"{help} (default: {default!r})"
        )
    settings.add_to_parser(parser, *TRAINING_GROUPS, only=LOOP_FLAGS)
    settings.add_to_parser(parser, "inputs", unset=True)
    add_model_flags(parser)
    return parser


if __name__ == "__main__":
    try:
        main()
    except (DataError, ValueError, FileNotFoundError, FloatingPointError, DiskFull) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
