"""setuptools build step that ships plugin/sb_eval_hook.pth at the root of the wheel.

setuptools installs only modules and package data; a .pth must sit directly in site-packages to
run at start-up, so build_py copies it there. (Editable installs do not carry it.)
"""

import os

from setuptools.command.build_py import build_py

PTH = "sb_eval_hook.pth"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), PTH)


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(SOURCE, os.path.join(self.build_lib, PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]
