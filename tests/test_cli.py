"""The entry points' argument types: any text gives a value in range or argparse's one-line complaint."""
import argparse
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from s5 import cli
from s5.config import FIELDS, ConfigError


@given(st.text(max_size=12) | st.integers(-10**12, 10**12).map(str) | st.floats().map(str))
def test_whole_number_accepts_only_the_range(text):
    parse = cli.whole_number(1, 60_000)
    try:
        value = parse(text)
    except argparse.ArgumentTypeError as e:
        assert "\n" not in str(e) and ("not a whole number" in str(e) or "out of range: give 1 to 60000" in str(e))
    else:
        assert isinstance(value, int) and 1 <= value <= 60_000


@given(st.text(max_size=12) | st.floats(allow_nan=True, allow_infinity=True).map(str))
def test_a_flag_made_from_a_field_is_finite_and_in_range(text):
    parse = cli.typed("lr", FIELDS["lr"])
    try:
        value = parse(text)
    except argparse.ArgumentTypeError as e:
        assert "\n" not in str(e)
    else:
        assert math.isfinite(value) and value > 0


def test_every_setting_has_one_definition_for_its_flag_and_its_check():
    """train.py's flags are made from FIELDS: the flag refuses what the configuration refuses, in the same words."""
    import train
    for name, field in FIELDS.items():
        if field.kind in (int, float):
            text = str(field.low - 1)
            with pytest.raises(ConfigError) as built:
                field.check(name, field.kind(text))
            with pytest.raises(SystemExit):
                train.build_parser().parse_args([cli.flag(name), text])
            assert built.value.reason.split(" is ", 1)[1] in capsys_err(train, name, text)


def capsys_err(train, name, text):
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
        train.build_parser().parse_args([cli.flag(name), text])
    return err.getvalue()


def test_parser_errors_are_one_line_with_exit_2(capsys):
    parser = cli.ArgumentParser(prog="train.py")
    parser.add_argument("--epochs", type=cli.whole_number(1))
    try:
        parser.parse_args(["--epochs", "0"])
    except SystemExit as stop:
        assert stop.code == 2
    err = capsys.readouterr().err
    assert err == "error: argument --epochs: 0 is out of range: give 1 or more (see train.py --help)\n"


def test_train_parser_keeps_only_the_flags_written():
    import train  # the one parse: absent flags leave no value, so the configuration's defaults apply

    assert vars(train.build_parser().parse_args(["--seed", "1", "--no-progress"])) == {"seed": 1, "progress": False}
    assert vars(train.build_parser().parse_args([])) == {}


def test_config_errors_are_worded_with_the_flag():
    assert cli.message(ConfigError("batch_size", "0 is out of range")) == "argument --batch-size: 0 is out of range"
    assert cli.message(ConfigError("name", "unknown")).startswith("argument --recipe:")


def test_logs_go_to_the_stdout_of_the_moment_and_warnings_to_stderr(capsys):
    import logging

    log = logging.getLogger("s5.test")
    cli.show_logs()
    cli.show_logs(level=logging.WARNING)  # again: the levels change, the handlers stay one pair
    log.info("hidden")
    log.warning("careful")
    cli.show_logs()
    log.info("shown")
    assert capsys.readouterr() == ("shown\n", "warning: careful\n")


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_stop_signal_ends_the_block_as_ctrl_c_does(name):
    import os
    import signal

    def ignore(signum, frame):  # what handled it before (s5.startup's, say)
        pass

    sig = getattr(signal, name)
    before = signal.signal(sig, ignore)
    try:
        with pytest.raises(KeyboardInterrupt), cli.stop_like_ctrl_c():
            os.kill(os.getpid(), sig)
        assert signal.getsignal(sig) is ignore  # and back after the block
    finally:
        signal.signal(sig, before)


def test_after_the_block_start_ups_handlers_give_way_to_pythons_own():
    import signal

    import s5.startup  # an entry point's first import: its handlers end the program at once while torch imports

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {sig: signal.signal(sig, s5.startup.stop) for sig in signals}
    try:
        with cli.stop_like_ctrl_c():
            pass
        assert [signal.getsignal(sig) for sig in signals] == [signal.default_int_handler, signal.SIG_DFL,
                                                              signal.SIG_DFL]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
