from mt.commands import convert_command


class FakeTTY:
    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return True


def test_progress_bar_on_a_tty_and_off_when_quiet(llama2_spm_dir, tmp_path, monkeypatch, capsys):
    tty = FakeTTY()
    monkeypatch.setattr("sys.stderr", tty)
    convert_command(llama2_spm_dir, tmp_path / "a.gguf", "q8_0", force=False, vocab_only=False, dry_run=False,
                    allow_pickle=False, threads=2, quiet=False, as_json=False)
    assert "writing" in tty.text and "100%" in tty.text
    assert "wrote" in capsys.readouterr().out
    quiet_tty = FakeTTY()
    monkeypatch.setattr("sys.stderr", quiet_tty)
    convert_command(llama2_spm_dir, tmp_path / "b.gguf", "q8_0", force=False, vocab_only=False, dry_run=False,
                    allow_pickle=False, threads=None, quiet=True, as_json=False)
    assert quiet_tty.text == "" and capsys.readouterr().out == ""
