"""Named presets: another toolkit's settings for attacks and defenses, selectable as one name.

A recipe (``experiments.recipes``) says how the victim trains; a preset says how the attacks and
defenses are configured, so that a user can put a figure beside a reference's (``RunConfig.preset``,
``backdoorlab run --preset backdoorbench``, ``preset:`` in a grid). Options given explicitly win
over the preset's; the preset's win over each method's own defaults, which follow its paper or
official code. A stored result holds the options the preset filled in, so it reruns without the
preset's code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from backdoorlab.registry import Registry


@dataclass(frozen=True)
class Preset:
    """Option defaults by method name for one dataset, and the trusted split's size."""

    attack_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: training-time defenses, repairs and detectors, by name
    defense_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the trusted clean split (a fraction or a count); ``None`` keeps the run's default
    trusted_size: float | int | None = None


#: name -> ``function(dataset) -> Preset``
PRESETS: Registry[Callable[[str], Preset]] = Registry("preset")


@PRESETS.register(
    "backdoorbench",
    "BackdoorBench's attack and defense configs (SCLBD/BackdoorBench f02e353, config/{attack,defense}/*/<dataset>.yaml)",
)
def backdoorbench(dataset: str) -> Preset:
    """BackdoorBench's settings (Wu et al., NeurIPS 2022 Datasets and Benchmarks; commit f02e353,
    ``config/attack/*/cifar10.yaml`` and ``config/defense/*/cifar10.yaml``). Its defenses get 5% of
    the training data as clean data (``ratio: 0.05``); here that is the trusted split, carved out
    before poisoning, where BackdoorBench draws it from the training images. Each entry names the
    reference file it follows."""
    attacks = dict(BACKDOORBENCH_ATTACKS)
    if dataset in LOW_FREQUENCY_STORED:
        attacks["low_frequency"] = {"pattern": f"{dataset}_preactresnet18"}
    return Preset(attack_options=attacks, defense_options=dict(BACKDOORBENCH_DEFENSES), trusted_size=0.05)


#: The datasets BackdoorBench stores low-frequency patterns for (``resource/lowFrequency/``), of those
#: registered here. For another (MNIST, digits) its ``attack/lf.py`` finds no file; the preset then
#: fits one with the paper's procedure (``pattern: generate``; reconstructed).
LOW_FREQUENCY_STORED = ("cifar10", "gtsrb")


#: BackdoorBench's attack options, by attack (each with the reference file it follows):
#: ``config/attack/<name>/default.yaml`` (BackdoorBench has no per-dataset attack yamls for these)
#: as ``utils/aggregate_block/bd_attack_generate.py`` applies it. Its clean-label attacks' ``pratio:
#: 0.1`` is ``round(0.1 * N)`` samples of the target class (``utils/backdoor_generate_poison_index.py``),
#: all of it on CIFAR-10: a run says ``poison_rate=1.0, poison_rate_of="target"`` for that (a rate is
#: a config field, not an option a preset sets).
BACKDOORBENCH_ATTACKS: dict[str, dict[str, Any]] = {
    # badnet: patch_mask_path resource/badnet/trigger_image.png, 255 at rows/cols 29-31 of 32 and
    # pasted where non-zero (utils/bd_img_transform/patch.py): the 3x3 white square at margin 0.
    "badnets": {"margin": 0},
    # blended: attack_trigger_img_path resource/blended/hello_kitty.jpeg, resized to the input,
    # attack_train_blended_alpha and attack_test_blended_alpha 0.2.
    "blended": {"pattern": "hello_kitty", "alpha": 0.2},
    # sig: sig_delta 40, sig_f 6.
    "sig": {"delta": 40.0, "frequency": 6.0},
    # lc: reduced_amplitude 1 (the pattern at full amplitude) with utils/bd_img_transform/lc.py's
    # default trigger all-corners; adversarial images by resource/label-consistent/craft_adv_dataset.py
    # (PGD eps 8, alpha 1.5, steps 100, in 0-255 units; torchattacks' PGD, random_start False).
    # Not expressible: its adversarially trained ResNet-18 surrogate (resnet18_PGD_best_model.pth).
    "label_consistent": {"position": "all-corners", "eps": 8.0, "step_size": 1.5, "steps": 100, "random_start": False},
    # bpp: config/attack/bpp/default.yaml (squeeze_num 8, dithering False, neg_ratio 0.1 of each batch
    # beside pratio 0.1: as many negative samples as poisoned ones). Not expressible: attack/bpp.py
    # poisons every batch anew in its own loop, with random crop 5, rotation 10, flip and MultiStepLR
    # (the run's recipe trains here, on samples poisoned once).
    "bpp": {"squeeze_num": 8, "dithering": False, "cross_ratio": 1.0},
    # ftrojan: config/attack/ftrojannn/default.yaml (YUV True, channel_list [1, 2], window_size 32,
    # pos_list (15, 15) and (31, 31): the defaults at 32 px, which scale with smaller images) with
    # magnitude 30 (the official code's 20 is the default).
    "ftrojan": {"magnitude": 30.0},
    # lf: attack/lf.py's lowFrequencyPatternPath resource/lowFrequency/{dataset}_{model}_0_255.npy
    # (the dataset's, preactresnet18: set per dataset in backdoorbench(), generated where none is
    # stored), added to the image and clipped (SimpleAdditiveTrigger); pratio 0.1.
    "low_frequency": {"pattern": "generate"},
    # ctrl: config/attack/ctrl/default.yaml (use_yuv True, trigger_channels [1, 2], pos_list [15, 31])
    # with utils/bd_img_transform/ctrl.py (magnitude 100, window_size img_size[0]): the defaults at
    # 32 px RGB (positions, channels and window resolve from the image, so grey 28 px still runs).
    # Clean-label, its pratio 0.05 of the training set (half of CIFAR-10's target class):
    # poison_rate=0.05, a run's field.
    "ctrl": {"magnitude": 100.0, "yuv": True},
    # refool: config/attack/refool/default.yaml (r_adv_img_folder_path resource/refool/.../
    # selected_out-images, ghost_rate 0.49, alpha_t 0.4, offset [0, 0], sigma -1 and ghost_alpha -1:
    # drawn per image) with attack/refool.py's blend_images at max_image_size = the image side.
    # Not expressible: its dirty-label run (clean_label: False, pratio 0.1), which is a run's fields
    # here: clean_label=False, poison_rate=0.1 (drawn from the non-target classes; BackdoorBench
    # draws from every class, utils/backdoor_generate_poison_index.py).
    "refool": {"reflections": "voc", "alpha_t": 0.4, "ghost_rate": 0.49},
    # ssba: config/attack/ssba/default.yaml (all2one, target 0, pratio 0.1: a run's fields) reads
    # images encoded by resource/ssba/: train.py as its readme runs it (fingerprint_length 100,
    # num_epochs 20 at batch_size 64 on the whole training set: 15,640 steps on CIFAR-10's 50,000
    # images; lr 1e-4; L2 weight 10 after l2_loss_await 1000 and l2_loss_ramp 3000 steps counted
    # from the first batch whose bits are read at > 0.9). Hours on a CPU; the trainer's bits often
    # stay unread (module docstring of attacks.ssba). Not expressible: its BCH-coded text secret.
    "ssba": {"steps": 15_640, "images": 50_000, "l2_await": 1000, "l2_ramp": 3000, "l2_start": "bits"},
    # poison_ink: config/attack/poison_ink/default.yaml (all2one, target 0, pratio 0.1: a run's
    # fields) reads images hidden by resource/poison_ink/: train.py as its readme runs it, three
    # stages (rot, crop, flip; no adv) of 200 epochs at batchSize 32 on the whole training set
    # (937,800 steps on CIFAR-10's 50,000 images), lr 2e-4, its H (up_UNet, 64 channels) and R
    # (HidingRes, 128), then trigger_generation.py (Sobel > 28, ink (80, 160, 80)). Days on a CPU.
    "poison_ink": {"steps": 3 * 200 * 1563, "images": 50_000, "hiding_width": 64, "reveal_width": 128},
}
#: BackdoorBench's defense options, by defense (each with the reference file it follows): the
#: values its code runs on CIFAR-10, ``config/defense/<name>/cifar10.yaml`` as ``defense/<name>.py``
#: reads it (SCLBD/BackdoorBench f02e353). What our options cannot express, and what is deliberately
#: not copied, is said beside each. Momentum is plain SGD there; the ``backdoorbench`` recipe's
#: (Nesterov off) carries into the repairs' fine-tuning.
BACKDOORBENCH_DEFENSES: dict[str, dict[str, Any]] = {
    # ft: config/defense/ft/cifar10.yaml (epochs 100, lr 0.01, CosineAnnealingLR with T_max 100,
    # batch_size 256, wd 5e-4).
    "fine_tuning": {"epochs": 100, "lr": 0.01, "batch_size": 256, "weight_decay": 5e-4, "schedule": "cosine"},
    # fp: config/defense/fp/cifar10.yaml (acc_ratio 0.1, a relative drop; then ft's fine-tuning:
    # epochs 100, lr 0.01 cosine, batch_size 256, wd 5e-4). Not copied: defense/fp.py:339-378 picks
    # the pruning depth on the test set, in steps of once_prune_ratio 0.01 of the channels, and
    # keeps the first depth past the threshold; here the depth is chosen on the trusted split,
    # channel by channel, the deepest within it.
    "fine_pruning": {"max_accuracy_drop": 0.1, "relative_drop": True, "epochs": 100, "lr": 0.01, "batch_size": 256},
    # nad: config/defense/nad/cifar10.yaml with defense/nad.py: teacher and student both train
    # te_epochs 10 (nad.py:821, 845; its epochs 100 is unused), batch_size 256, wd 5e-4 (the
    # yaml's weight_decay 1e-4 is not read), p 2; the student at a constant lr 0.01
    # (adjust_learning_rate, nad.py:77-88), the teacher under a cosine with T_max 100, 0.01 to
    # 0.0098 over its 10 epochs (here constant too). beta1 500 on layer3 and beta2 1000 on layer4
    # (nad.py:292-330); beta3 1000 is on the pooled 1x1 output, whose attention map is 1 for every
    # input, so that term is zero: two betas, the last two blocks (PreAct-ResNet18's layer3-4).
    "nad": {
        "teacher_epochs": 10,
        "epochs": 10,
        "lr": 0.01,
        "schedule": "constant",
        "batch_size": 256,
        "weight_decay": 5e-4,
        "betas": [500.0, 1000.0],
        "p": 2.0,
    },
    # nc: config/defense/nc/cifar10.yaml (mask_lr 0.1, init_cost 1e-3, cost_multiplier 2, patience
    # 5: the defaults here; nc_epoch 80 epochs of batch_size 256 over the 5% split, 2,500 CIFAR-10
    # images, 10 batches an epoch: 800 steps; anomaly threshold 2; unlearning_ratio 0.2 of every
    # flagged label; then epochs 100, lr 0.01 cosine). Not expressible: atk_succ_threshold 98% (here
    # 99%, the official example's) and its early stop (early_stop_patience 25).
    "neural_cleanse": {
        "steps": 800,
        "batch_size": 256,
        "init_cost": 1e-3,
        "threshold": 2.0,
        "unlearning_share": 0.2,
        "epochs": 100,
        "lr": 0.01,
    },
    # abl: config/defense/abl/cifar10.yaml with defense/abl.py: tuning_epochs 20 of isolation on
    # un-augmented data (abl.py:481-486, train=False; Flooding at 0.5, whose gradient is LGA's at
    # gamma 0.5), isolation_ratio 0.01, unlearning_epochs 20 at lr 1e-4 (hard-coded, abl.py:208-222;
    # the yaml's lr_unlearning_init 5e-4 is not read), batch_size 256. Not expressible: the
    # isolation stage's lr 0.01 and the 60 epochs on the rest (0.01, then 0.001 from epoch 40),
    # which follow the run's recipe here, and its augmented unlearning (abl.py:655-664; the
    # official code's has none, as here).
    "abl": {
        "isolation_epochs": 20,
        "isolation_ratio": 0.01,
        "gamma": 0.5,
        "unlearning_epochs": 20,
        "unlearning_lr": 1e-4,
        "unlearning_batch_size": 256,
        "isolation_augmentation": False,
    },
    # nab: config/defense/nab/cifar10.yaml with defense/nab.py: SimCLR epoch_self 100 at DBD's
    # pretrain config (batch 512, lr 0.4, temperature 0.5; its cosine T_max 1000 keeps the rate
    # near 0.4: constant here); LGA epoch_lga 20 at lr 0.01, batch_size_lgd 64, gamma 0.5; the
    # lowest-loss 10% relabelled by the nearest centre, the centres without the lowest 20%; then
    # epochs 100 at lr 0.01 (never scheduled: its scheduler.step() steps SimCLR's), batch_size
    # 256, wd 1e-4.
    "nab": {
        "ssl_epochs": 100,
        "ssl_lr": 0.4,
        "ssl_batch_size": 512,
        "temperature": 0.5,
        "detection_epochs": 20,
        "detection_lr": 0.01,
        "detection_batch_size": 64,
        "gamma": 0.5,
        "isolation_ratio": 0.1,
        "centroid_exclusion": 0.2,
        "epochs": 100,
        "lr": 0.01,
        "batch_size": 256,
        "weight_decay": 1e-4,
    },
    # clp: config/defense/clp/cifar10.yaml (u 3; its u_min / u_max / u_num sweep is reported on
    # the test set, and is not copied) with defense/clp.py's CLP_prune, as the official code.
    "clp": {"u": 3.0},
    # ft-sam: config/defense/ft-sam/cifar10.yaml with defense/ft-sam.py (rho 2, adaptive, label
    # smoothing 0.1, lr 0.01 cosine, batch 256, 100 epochs): the defaults of ft_sam, restated.
    "ft_sam": {"epochs": 100, "lr": 0.01, "batch_size": 256, "rho": 2.0, "adaptive": True, "label_smoothing": 0.1},
    # bnp: config/defense/bnp/cifar10.yaml (u 3, ratio 0.05 of clean data) with defense/bnp.py. Not
    # copied: bnp_defense compares the running statistics with one batch of the poisoned training
    # set (its second forward pass overwrites the clean batch's); here the trusted split's.
    "bnp": {"u": 3.0},
    # ep: config/defense/ep/cifar10.yaml (u 3, batch_size 256; its u_min / u_max / u_num sweep is
    # reported on the test set, and is not copied) with defense/ep.py's EP_defense.
    "ep": {"u": 3.0, "batch_size": 256},
    # anp: config/defense/anp/cifar10.yaml with defense/anp.py (anp_eps 0.4, anp_steps 1, anp_alpha
    # 0.2, nb_iter 2000, batch_size 256, and the mask optimiser at the yaml's lr 0.01 where the
    # official code has 0.2). Not copied: its pruning threshold is the one of 0, 0.05, ..., 0.9 with
    # the lowest *test* ASR within 10% of the clean accuracy; here the paper's fixed 0.2.
    "anp": {"eps": 0.4, "steps": 1, "alpha": 0.2, "iterations": 2000, "batch_size": 256, "lr": 0.01},
    # i-bau: config/defense/i-bau/cifar10.yaml with defense/i-bau.py (n_rounds 5, K 5, Adam at the
    # yaml's lr 1e-4 where the official code has 1e-3, built with amsgrad=True by
    # train_settings_generate.py, batch_size 256; the outer loss's portion 0.01 and the
    # perturbation's SGD lr 10, both hard-coded, as the defaults here). Not copied: BackdoorBench
    # adds the perturbation to normalised images (so its lr 10 and 0.001 ||delta||^2 act in
    # normalised units; here pixel units, as the official code) and draws shuffled, augmented batches
    # (here the official code's fixed, unaugmented order).
    "i_bau": {"rounds": 5, "K": 5, "lr": 1e-4, "batch_size": 256, "amsgrad": True},
    # rnp: config/defense/rnp/config.yaml with defense/rnp.py (its argparse defaults: alpha 0.2,
    # clean_threshold 0.2, unlearning lr 0.01 and recovering lr 0.2, 20 recovering epochs; batch_size
    # 256 from the yaml; ratio 0.01 of clean data). Its unlearning runs at most 20 epochs (range(20);
    # the official code 21: unlearning_epochs counts one less here), and the model it returns is
    # pruned at its pruning_number, 0.70 (defense/rnp.py:571 and :989-1043; its threshold sweep on the
    # test set only writes a table).
    "rnp": {"batch_size": 256, "unlearning_epochs": 19, "threshold": 0.7},
    # sau: config/defense/sau/cifar10.yaml with defense/sau.py (n_rounds 100, batch 256, Adam lr
    # 1e-4 with amsgrad (train_settings_generate.py) never scheduled, L_inf 0.2, adv_lr 0.2, 5 steps from max, beta 0.01 / 1, lmd 1 / 0 / 1):
    # the defaults of sau, restated.
    "sau": {"rounds": 100, "batch_size": 256, "lr": 1e-4, "bound": 0.2, "step_size": 0.2, "steps": 5},
    # npd: config/defense/npd/cifar10.yaml (the same as config.yaml) with defense/npd.py (epochs 50,
    # batch_size 128, lr 0.01 never scheduled (its CosineAnnealingLR belongs to the frozen model's
    # optimiser), momentum 0.9 and wd 5e-4 hard-coded, model_name convbn, norm_type L2, trigger_norm
    # 3.0, adv_lr 0.1 hard-coded, inner_steps 2, warm_epochs 5 at a hard-coded lr 1e-4, lmd1-4 1 /
    # 0.4 / 0.4 / 0.4): the defaults of npd, restated. Not expressible: its target_layer_name
    # layer4.1.conv1, inside PreAct-ResNet18's last stage; here the polarizer is at that stage's input.
    "npd": {
        "epochs": 50,
        "batch_size": 128,
        "lr": 0.01,
        "warm_epochs": 5,
        "bound": 3.0,
        "step_size": 0.1,
        "steps": 2,
        "lambda_1": 1.0,
        "lambda_2": 0.4,
        "lambda_3": 0.4,
        "lambda_4": 0.4,
    },
    # mcr: config/defense/mcr/cifar10.yaml with defense/mcr.py (num_bends 3, Bezier, test_t 0.1,
    # train_curve_epochs 100 at SGD lr 3e-5 momentum 0.9 wd 5e-4 cosine, batch 128; the endpoint
    # fine-tuned ft_epochs 100 at lr 0.01, wd 5e-4, cosine). Its curve loop never zeroes the
    # evaluated model's gradient, so each bend step takes the sum of all gradients so far
    # (accumulate_gradients). Not copied: its BN update continues from the curve training's
    # statistics (momentum 0.1, augmented); here they restart, as the official update_bn.
    "mcr": {
        "t": 0.1,
        "epochs": 100,
        "lr": 3e-5,
        "batch_size": 128,
        "weight_decay": 5e-4,
        "accumulate_gradients": True,
        "tuning_epochs": 100,
        "tuning_lr": 0.01,
        "tuning_batch_size": 128,
        "tuning_weight_decay": 5e-4,
    },
    # ac: config/defense/ac/cifar10.yaml (nb_dims 10, nb_clusters 2, cluster_analysis smaller) with
    # defense/ac.py, which reduces by PCA (hard-coded reduce='PCA'). Not copied: it clusters each
    # shuffled, augmented batch of 256 on its own and reads the verdicts back in a reshuffled order;
    # here each class is clustered whole, as ART does. Then retrains at the run's recipe.
    "activation_clustering": {"nb_dims": 10, "reduce": "pca", "cluster_analysis": "smaller"},
    # spectral: config/defense/spectral/cifar10.yaml (percentile 85, every label examined) with
    # defense/spectral.py's score (the official code's uncentred projection, the default here).
    "spectral_signatures": {"percentile": 85.0, "centred": False},
    # asset: config/detection/asset/cifar10.yaml (batch_size 256, lr 1e-4, n_rounds 1) with
    # detection_pretrain/asset.py (the MLP and its 100 steps at lr 1e-4, outlyingness cut 2, get_t at
    # eps 1e-6). Not copied: its base set, 2% of the clean training set; ASSET reads the run's trusted
    # split (the preset's 5%).
    "asset": {"batch_size": 256, "lr": 1e-4, "rounds": 1},
    # d-br: config/defense/d-br/cifar10.yaml (clean_ratio 0.2, poison_ratio 0.05, batch_size 128,
    # lr 0.01) with defense/d-br.py's set_new_args (2 epochs without augmentation, 10 of L_intra,
    # 20 of unlearning and relearning at lr 1e-4, batch 128): the official code's, the defaults.
    # Not expressible: its SD stages' CosineAnnealingLR (T_max 100; constant 0.01 here) and the
    # momentum carried between stages; its BR starts from the attack's model, here the run's.
    "d_br": {
        "clean_ratio": 0.2,
        "poison_ratio": 0.05,
        "sd_epochs": 2,
        "intra_epochs": 10,
        "sd_lr": 0.01,
        "sd_batch_size": 128,
        "removal_epochs": 20,
        "removal_lr": 1e-4,
        "removal_batch_size": 128,
    },
    # d-st: config/defense/d-st/cifar10.yaml (batch_size 128, lr 0.01; clean_ratio 0.2 and
    # poison_ratio 0.05 from the parser) with defense/d-st.py's set_new_args and
    # utils/defense_utils/dst/utils_st.py's set_optimizer (weight decay 5e-4 in both ST stages):
    # SD as d-br's; extractor 200 epochs at lr 0.5, temperature 0.1, cosine with 10 warm-up
    # epochs; classifier 10 epochs at lr 5. Not expressible: the classifier's warm-up from 0.01
    # to 5 over its 10 epochs (constant 5 here, as the official code), and its batches over every
    # sample (here the clean and poisoned parts only, as the official code).
    "d_st": {
        "clean_ratio": 0.2,
        "poison_ratio": 0.05,
        "sd_epochs": 2,
        "intra_epochs": 10,
        "sd_lr": 0.01,
        "sd_batch_size": 128,
        "extractor_epochs": 200,
        "extractor_lr": 0.5,
        "extractor_batch_size": 128,
        "extractor_weight_decay": 5e-4,
        "temperature": 0.1,
        "classifier_epochs": 10,
        "classifier_lr": 5.0,
        "classifier_batch_size": 128,
        "classifier_weight_decay": 5e-4,
    },
}


def preset_for(name: str, dataset: str) -> Preset:
    """The preset ``name`` for ``dataset``."""
    return PRESETS.get(name)(dataset)
