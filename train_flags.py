"""train_script.py's flags: the common training flags, the sample-quality flags, each model's Config fields, and
--config files (config_file.py) whose values become the defaults that the command line overrides.

    args = train_flags.parse_args(["--model", "VAE", "--epochs", "5"])
"""
import argparse
import sys

import common
import config_file
import fid
from common import UserError, checked
from registry import MODELS
from unet import CONDITIONS

DESCRIPTION = "Train any model of genlab: `python train_script.py --model VAE > log/train_VAE.out`."
# The common flags' defaults; a model's TRAIN_DEFAULTS override these.
COMMON_DEFAULTS = dict(epochs=20, batch_size=16, lr=1e-3, lr_decay=1.0, lr_decay_every=10, optimizer="adam",
                       momentum=0.0, weight_decay=0.0, grad_clip=0.0, grad_accum=1, val_every=1, patience=5,
                       flip=False, fid_every=0, adam_beta1=0.9, adam_beta2=0.999)

def build_parser(model_name=None, add_help=True):
    parser = common.ArgumentParser(description=DESCRIPTION, add_help=add_help,
                                   epilog=None if model_name else "`--model X --help` lists the flags of model X")
    parser.add_argument("--model", required=add_help and model_name is None, choices=list(MODELS),
                        help="which model to train")
    parser.add_argument("--config", default=None, help="a TOML file of flag values (see config_file.py and configs/); "
                        "flags given on the command line override it (default: none)")
    if model_name is None:
        return parser
    module = MODELS[model_name]
    d = {**COMMON_DEFAULTS, **module.TRAIN_DEFAULTS}
    g = parser.add_argument_group("data")
    g.add_argument("--data", default="shapes", help="a folder of images (class sub-folders give classes), or a "
                   "built-in dataset: shapes (one shape, 9 classes) or objects (1-3 of 24 labels, with layouts) "
                   "(default: shapes)")
    g.add_argument("--labels", default=None, help="a train.json (image file -> list of label names) giving each "
                   "image of the --data folder a set of labels; needs --label-names (see scenes.py)")
    g.add_argument("--label-names", default=None, help="an objects.json (label name -> index)")
    g.add_argument("--layouts", default=None, help="the images' layouts: a folder of PNG maps (1 + label index per "
                   "pixel, 0 background) named as the images, or a boxes .json; needs --label-names")
    g.add_argument("--condition", default="auto", choices=("auto", "none", *CONDITIONS),
                   help="what conditional models condition on: class, labels (multi-hot) or layout; auto: labels when "
                        "the data has them, else the class when there are several (default: auto)")
    g.add_argument("--image-size", type=checked(int, 4), default=24, help="images are resized to this square size "
                   "(default: 24)")
    g.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="1 or 3 (default: 1 when every image is grayscale, else 3)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=d["flip"],
                   help=f"random horizontal flips of training images (default: {common.describe_default(d['flip'])})")
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=checked(int, 1), default=d["epochs"], help=f"total epochs (default: {d['epochs']})")
    g.add_argument("--batch-size", type=checked(int, 1), default=d["batch_size"],
                   help=f"images per optimiser step (default: {d['batch_size']})")
    g.add_argument("--grad-accum", type=checked(int, 1), default=d["grad_accum"],
                   help="split each batch into this many micro-batches, one backward pass each, and step once: "
                        f"the gradient of the whole batch in less memory (default: {d['grad_accum']})")
    g.add_argument("--lr", type=checked(float, 0), default=d["lr"], help=f"learning rate (default: {d['lr']})")
    g.add_argument("--lr-decay", type=checked(float, 0), default=d["lr_decay"],
                   help=f"multiply the lr by this every --lr-decay-every epochs (default: {d['lr_decay']})")
    g.add_argument("--lr-decay-every", type=checked(int, 1), default=d["lr_decay_every"],
                   help=f"epochs between two lr decays (default: {d['lr_decay_every']})")
    g.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default=d["optimizer"],
                   help=f"adam, adamw (decoupled weight decay) or sgd (default: {d['optimizer']})")
    g.add_argument("--momentum", type=checked(float, 0), default=d["momentum"],
                   help=f"SGD momentum (default: {d['momentum']}, plain SGD)")
    g.add_argument("--adam-beta1", type=checked(float, 0, below=1), default=d["adam_beta1"],
                   help=f"Adam's beta1, the decay of its gradient average (default: {d['adam_beta1']})")
    g.add_argument("--adam-beta2", type=checked(float, 0, below=1), default=d["adam_beta2"],
                   help=f"Adam's beta2, the decay of its squared-gradient average (default: {d['adam_beta2']})")
    g.add_argument("--weight-decay", type=checked(float, 0), default=d["weight_decay"],
                   help=f"L2 penalty (adam, sgd) or decoupled decay (adamw) (default: {d['weight_decay']})")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="the forward pass under autocast in bfloat16 or float16 (fp16 with a gradient scaler); "
                        "weights, losses and optimiser stay fp32 (default: fp32)")
    g.add_argument("--compile", action="store_true", help="torch.compile the trained networks (compiled at the "
                   "first step: a minute or more on a CPU)")
    g.add_argument("--grad-clip", type=checked(float, 0), default=d["grad_clip"],
                   help=f"clip the gradient norm to this; 0: off (default: {d['grad_clip']})")
    g.add_argument("--val-every", type=checked(int, 1), default=d["val_every"],
                   help=f"validate every N epochs and at the last (default: {d['val_every']})")
    g.add_argument("--patience", type=checked(int, 1), default=d["patience"],
                   help=f"stop after this many validations without a new best (default: {d['patience']})")
    g.add_argument("--seed", type=checked(int, 0), default=0, help="seeds the 80/20 split (as torch.manual_seed(seed) "
                   "then random_split) and training (default: 0)")
    g.add_argument("--train-seed", type=checked(int, 0), default=None, help="seeds training alone (initial weights, "
                   "batch order, training noise) and leaves the split and the fixed noise of validation and sample "
                   "quality to --seed: runs that differ only in it show the spread of one setting on one split "
                   "(default: --seed)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="where to train; auto: cuda, else mps, else cpu (default: auto)")
    g.add_argument("--resume", action="store_true", help="continue from <models-dir>/Last_<run>.pth with its settings")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run of the same --run-name "
                   "(without it, a new run never replaces saved checkpoints)")
    g.add_argument("--run-name", default=None, help="names checkpoints and the log folder (default: the model name)")
    g.add_argument("--models-dir", default="models", help="where checkpoints go (default: models)")
    g.add_argument("--log-dir", default="log", help="TensorBoard runs go to <log-dir>/<run> (default: log)")
    g = parser.add_argument_group("sample quality (fid.py)")
    g.add_argument("--fid-every", type=checked(int, 0), default=d["fid_every"],
                   help="every N epochs (and the last) generate --fid-samples images and log FID/KID against the "
                        f"validation images; models without a meaningful val_loss select Best on it (0: off; "
                        f"default: {d['fid_every']})")
    g.add_argument("--fid-samples", type=checked(int, 0), default=0,
                   help="how many samples to measure (default: 0, as many as validation images)")
    fid.add_metric_flags(g)
    g.add_argument("--select-by", choices=("fd", "swd"), default="fd",
                   help="what Best and early stopping follow in models that select by sample quality (the GAN): fd, "
                        "the Fréchet distance of the first --fid-features (FID or FD_eval); swd, the sliced "
                        "Wasserstein distance (needs --swd), which still ranks samples past FD_eval's floor "
                        "(default: fd)")
    parser.set_defaults(**module.TRAIN_DEFAULTS)   # a model may also default the metric flags (--fid-features)
    common.add_config_flags(parser, module.Config, f"{model_name} options (from {module.__name__}.py)")
    return parser


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    known, _ = build_parser(add_help=False).parse_known_args(argv)
    from_file = config_file.read(known.config) if known.config else {}
    # The file's values become the parser's defaults, so a flag on the command line wins; the model may come from it.
    model = known.model or config_file.parser_values(build_parser(add_help=False), from_file, known.config,
                                                     keys=["model"]).get("model")
    parser = build_parser(model)
    if model is not None:
        parser.set_defaults(**config_file.parser_values(parser, from_file, known.config))
    args = parser.parse_args(argv)
    args.run_name = args.run_name or args.model
    if args.select_by != "fd" and not MODELS[args.model].Model.selects_by_sample_quality:
        raise UserError(f"--select-by {args.select_by}: the {args.model} model chooses Best on its val_loss; drop "
                        "--select-by (it applies to models that select by sample quality, as the GAN)")
    if args.select_by == "swd" and not args.swd:
        raise UserError("--select-by swd chooses Best on SWD, which is measured with --swd: add --swd")
    if args.resume and args.overwrite:
        raise UserError("--resume continues a run and --overwrite replaces it; pass one of them")
    return args
