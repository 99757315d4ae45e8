"Settings: settings.ini < JEPA_LAB_<KEY> env < notebook parameter; typed; unknown keys refused."
import pytest

from jepa_lab.core import SETTING_KEYS, SettingsError, load_settings


@pytest.fixture
def project(tmp_path):
    (tmp_path / "settings.ini").write_text(
        "[jepa_lab]\nseed = 1\ndevice = cpu\ndtype = float32\nthreads = 2\ndata_path = d\n")
    (tmp_path / "nbs").mkdir()
    return tmp_path


def test_precedence_file_env_param(project):
    s = load_settings(project / "nbs", environ={})
    assert (s.seed, s.device, s.threads) == (1, "cpu", 2)
    assert s.root == project and s.data_path == project / "d"
    s = load_settings(project, environ={"JEPA_LAB_SEED": "5", "JEPA_LAB_THREADS": "3"})
    assert (s.seed, s.threads, s.device) == (5, 3, "cpu")
    s = load_settings(project, environ={"JEPA_LAB_SEED": "5"}, seed=9, device=None)
    assert s.seed == 9 and s.device == "cpu"  # a None parameter leaves the lower layers alone
    assert s.sources["seed"] == "a notebook parameter" and s.sources["device"].endswith("settings.ini")


def test_defaults_without_a_file(tmp_path):
    s = load_settings(tmp_path, environ={})
    assert (s.device, s.dtype, s.seed) == ("auto", "auto", 0) and s.runs_path == tmp_path / "runs"


@pytest.mark.parametrize("where", ["file", "env", "param"])
def test_unknown_key_lists_valid_ones(project, where):
    environ, params = {}, {}
    if where == "file":
        (project / "settings.ini").write_text("[jepa_lab]\nsed = 3\n")
    elif where == "env":
        environ = {"JEPA_LAB_SED": "3"}
    else:
        params = {"sed": 3}
    with pytest.raises(SettingsError) as e:
        load_settings(project, environ=environ, **params)
    assert "'sed'" in str(e.value) and all(k in str(e.value) for k in SETTING_KEYS)


@pytest.mark.parametrize("env,needle", [({"JEPA_LAB_SEED": "two"}, "seed"), ({"JEPA_LAB_DTYPE": "fp8"}, "dtype"),
                                        ({"JEPA_LAB_DEVICE": "tpu"}, "device")])
def test_bad_values_name_the_key_and_origin(project, env, needle):
    with pytest.raises(SettingsError) as e:
        load_settings(project, environ=env)
    assert needle in str(e.value) and "JEPA_LAB_" in str(e.value)


def test_runner_variable_is_not_a_setting(project):
    assert load_settings(project, environ={"JEPA_LAB_RUN_DIR": "/tmp/x"}).seed == 1
