"""keyring backends for tests: in memory (in-process) and a JSON file (across processes, selected with
PYTHON_KEYRING_BACKEND=fakes.test_keyring.FileKeyring and AUTORESEARCH_TEST_KEYRING=<path>)."""

import json
import os

from keyring.backend import KeyringBackend
from keyring.errors import PasswordDeleteError


class MemoryKeyring(KeyringBackend):
    priority = 1

    def __init__(self):
        super().__init__()
        self.store = {}

    def get_password(self, service, username):
        return self.store.get((service, username))

    def set_password(self, service, username, password):
        self.store[(service, username)] = password

    def delete_password(self, service, username):
        if (service, username) not in self.store:
            raise PasswordDeleteError("not found")
        del self.store[(service, username)]


class FileKeyring(KeyringBackend):
    priority = 1

    @property
    def path(self):
        return os.environ["AUTORESEARCH_TEST_KEYRING"]

    def _load(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _save(self, data):
        with open(self.path, "w") as f:
            json.dump(data, f)

    def get_password(self, service, username):
        return self._load().get(f"{service}/{username}")

    def set_password(self, service, username, password):
        data = self._load()
        data[f"{service}/{username}"] = password
        self._save(data)

    def delete_password(self, service, username):
        data = self._load()
        if f"{service}/{username}" not in data:
            raise PasswordDeleteError("not found")
        del data[f"{service}/{username}"]
        self._save(data)
