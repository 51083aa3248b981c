"""Training curves drawn from a trainer's log history."""

from PIL import Image

from trl_arcopo.utils.plots import plot_training_curves, training_curves_figure

# What ARCoPOTrainer logs: rollout steps carry rewards, every step carries loss statistics, evaluations are prefixed
# with `eval_`, a metric with no finite value is None, and training ends with a summary entry.
HISTORY = [
    {
        "step": 1,
        "reward": 0.5,
        "rewards/videoalign:VQ/mean": 3.8,
        "rewards/videoalign:MQ/mean": 1.7,
        "rewards/videoalign:VQ/std": 0.2,
        "clip_ratio/region_mean": 0.0,
        "ratio/mean": 1.0,
        "ratio/min": 1.0,
        "kl": None,
        "loss": 0.1,
    },
    {"step": 2, "clip_ratio/region_mean": 0.25, "ratio/mean": 1.5, "ratio/min": 0.5, "loss": 0.2},
    {"step": 3, "reward": 0.75, "rewards/videoalign:VQ/mean": 4.0, "rewards/videoalign:MQ/mean": None},
    {"step": 3, "eval_reward": 0.6, "eval_rewards/videoalign:VQ/mean": 3.9, "eval_runtime": 1.0},
    {"step": 3, "train_runtime": 12.0, "train_loss": 0.15},
]


def _lines(figure):
    return {
        axes.get_title(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.lines}
        for axes in figure.axes
    }


def test_one_panel_per_metric_group_with_the_logged_values():
    lines = _lines(training_curves_figure(HISTORY))
    assert list(lines) == ["Reward", "Rewards per function / head", "Clipped fraction", "Policy ratio"]
    assert lines["Reward"] == {"reward": ([1, 3], [0.5, 0.75]), "eval:reward": ([3], [0.6])}
    assert lines["Rewards per function / head"] == {
        "videoalign:MQ": ([1], [1.7]),  # the None at step 3 is skipped
        "videoalign:VQ": ([1, 3], [3.8, 4.0]),
        "eval:videoalign:VQ": ([3], [3.9]),
    }
    assert lines["Clipped fraction"] == {"clip_ratio/region_mean": ([1, 2], [0.0, 0.25])}
    assert lines["Policy ratio"] == {"ratio/mean": ([1, 2], [1.0, 1.5]), "ratio/min": ([1, 2], [1.0, 0.5])}


def test_eval_values_are_markers_and_ratios_are_on_a_log_scale():
    figure = training_curves_figure(HISTORY)
    reward_axes, *_, ratio_axes = figure.axes
    styles = {line.get_label(): (line.get_linestyle(), line.get_marker()) for line in reward_axes.lines}
    assert styles == {"reward": ("-", "None"), "eval:reward": ("None", "o")}
    assert ratio_axes.get_yscale() == "log" and reward_axes.get_yscale() == "linear"


def test_a_long_reward_series_gets_its_running_mean():
    rewards = [float(i % 3) for i in range(18)]  # swings 0, 1, 2: the trend is flat at 1
    history = [{"step": 2 * i + 1, "reward": r, "rewards/redness/mean": r} for i, r in enumerate(rewards)]
    lines = _lines(training_curves_figure(history))
    for title, label in (("Reward", "reward"), ("Rewards per function / head", "redness")):
        assert set(lines[title]) == {label, f"{label}, mean of last 3"}
        steps, mean = lines[title][f"{label}, mean of last 3"]
        assert steps == lines[title][label][0] == list(range(1, 37, 2))
        assert mean[:3] == [0.0, 0.5, 1.0] and mean[3:] == [1.0] * 15  # fewer values at the start
    # Short series, and the other panels, are drawn as logged.
    assert set(_lines(training_curves_figure(history[:11]))["Reward"]) == {"reward"}


def test_kl_gets_a_panel_once_it_is_logged():
    lines = _lines(training_curves_figure([{"step": 1, "kl": 0.01}, {"step": 2, "kl": 0.02}]))
    assert lines == {"KL to the reference": {"kl": ([1, 2], [0.01, 0.02])}}


def test_a_history_without_metrics_still_gives_a_figure(tmp_path):
    figure = training_curves_figure([{"step": 1, "loss": 0.3}, {"train_runtime": 1.0}])
    assert len(figure.axes) == 1 and not figure.axes[0].lines
    assert "no reward" in figure.axes[0].texts[0].get_text()
    assert plot_training_curves([], tmp_path / "empty.png").is_file()


def test_plot_training_curves_writes_the_image(tmp_path):
    path = plot_training_curves(HISTORY, tmp_path / "plots" / "curves.png")
    assert path == tmp_path / "plots" / "curves.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (640, 4 * 260)  # 6.4 in wide, 2.6 in per panel, 100 dpi
