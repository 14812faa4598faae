"""build_data regenerates a demo dataset of another size, and leaves every other dataset alone."""
from dinowm.data import demo_dataset_is_current
from dinowm.data.sim import GENERATOR_NAME
from franka_fixtures import write_franka_dataset


def test_demo_dataset_of_another_size_is_not_current(tmp_path):
    assert not demo_dataset_is_current(tmp_path / "none", 4, 150)
    ours = write_franka_dataset(tmp_path / "ours", metadata={"generator": GENERATOR_NAME,
                                                            "generation": {"episodes": 4, "frames": 150}})
    assert demo_dataset_is_current(ours, 4, 150)
    assert not demo_dataset_is_current(ours, 8, 150) and not demo_dataset_is_current(ours, 4, 100)
    foreign = write_franka_dataset(tmp_path / "foreign", metadata={"fps": 10})
    assert demo_dataset_is_current(foreign, 8, 150)  # a user's dataset is never regenerated
