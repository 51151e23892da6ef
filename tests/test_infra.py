"""Offline checks of the cloud infrastructure (infra/, .dockerignore): nothing here contacts GCP or Kubernetes.

1. Every YAML file under infra/ parses.
2. infra/gcp/cluster.yaml passes Ray's own cluster-config validation (the steps `ray up` runs before it
   talks to GCP: prepare_config, then validate_config against ray-schema.json) and keeps the security
   and cost decisions (CPU-0 head, loopback dashboard, token auth, Spot GPU workers, own service accounts).
3. Every `python jobs/<script>.py ...` command in the YAML files, the k8s manifests, docs/gcp.md,
   README.md and docs/*.md names a job that exists and only flags its real argument parser accepts.
4. The Dockerfile installs from pyproject.toml only, copies no credentials, and matches the Ray version
   of this environment; .dockerignore keeps .venv and .git out; the k8s manifests agree with each other.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
CLUSTER = INFRA / "gcp" / "cluster.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
K8S = INFRA / "k8s"
README = REPO / "README.md"

DOCS = REPO / "docs"
# The GCP walk-through: docs/gcp.md, "From zero to predictions on GCP".
GCP_DOC = DOCS / "gcp.md"

YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))
DOC_FILES = [README] + sorted(DOCS.glob("*.md"))


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def load_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# --------------------------------------------------------------------------------------------------------
# 1. YAML parses


def test_infra_has_the_expected_files():
    for p in (CLUSTER, DOCKERFILE, DOCKERIGNORE, K8S / "serviceaccount.yaml", K8S / "raycluster.yaml",
              K8S / "rayjob-train.yaml", K8S / "rayjob-tune.yaml"):
        assert p.is_file(), f"missing {rel(p)}"
    assert "# From zero to predictions on GCP" in GCP_DOC.read_text(), f"no GCP walk-through in {rel(GCP_DOC)}"


@pytest.mark.parametrize("path", YAML_FILES, ids=[rel(p) for p in YAML_FILES])
def test_yaml_parses(path):
    try:
        docs = load_docs(path)
    except yaml.YAMLError as e:
        pytest.fail(f"{rel(path)} is not valid YAML: {e}")
    assert docs, f"{rel(path)} holds no YAML document"
    assert all(isinstance(d, dict) for d in docs), f"{rel(path)}: every document should be a mapping"


# --------------------------------------------------------------------------------------------------------
# 2. The GCP cluster config


def prepared_cluster_config() -> dict:
    """What `ray up` validates: the YAML merged with Ray's GCP defaults (no GCP call is made)."""
    from ray.autoscaler._private.util import prepare_config
    return prepare_config(copy.deepcopy(yaml.safe_load(CLUSTER.read_text())))


def test_cluster_yaml_passes_rays_schema_validation():
    pytest.importorskip("jsonschema")  # ray[default] brings it; validate_config needs it
    from ray.autoscaler._private.util import validate_config
    validate_config(prepared_cluster_config())


def test_cluster_schema_validation_catches_a_broken_config():
    """Self-check: the validation above really rejects a wrong config (an unknown key, a bad type)."""
    jsonschema = pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import validate_config
    bad = prepared_cluster_config()
    bad["no_such_option"] = True
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)
    bad = prepared_cluster_config()
    bad["available_node_types"]["ray_worker_gpu"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)


def test_cluster_yaml_keeps_its_security_and_cost_decisions():
    text = CLUSTER.read_text()
    config = prepared_cluster_config()
    types = config["available_node_types"]
    head_type = config["head_node_type"]
    head = types[head_type]
    workers = {name: t for name, t in types.items() if name != head_type}

    # The head takes no Ray work.
    assert head["resources"].get("CPU") == 0, "the head node type must declare CPU 0"
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--num-cpus=0" in head_start
    # Dashboard / job server on loopback only, reached through `ray dashboard` (SSH); no open address.
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in text, "nothing may listen on all interfaces"
    # Ray token auth on every node; the token comes from a file, never from the YAML.
    run_options = " ".join(config["docker"].get("run_options", []))
    assert "RAY_AUTH_MODE=token" in run_options and "RAY_AUTH_TOKEN_PATH=" in run_options
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd, f"start command without token auth: {cmd}"
    assert not re.search(r"RAY_AUTH_TOKEN\s*=\s*[^\s$]", text), "a literal Ray token in cluster.yaml"
    assert "secretmanager" in text.lower() or "gcloud secrets" in text, "where the token comes from"
    # The image carries everything: no pip installs at boot (Ray's GCP defaults would add some).
    all_setup = config["setup_commands"] + config["head_setup_commands"] + config["worker_setup_commands"]
    assert not [c for c in all_setup if "pip install" in c], all_setup
    assert config["docker"]["image"] and not config["docker"]["image"].startswith("rayproject/")
    # Spot GPU workers, autoscaled from zero.
    assert workers, "no worker node type"
    gpu_types = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker node type"
    for name, t in gpu_types.items():
        sched = t["node_config"].get("scheduling", {})
        assert sched.get("provisioningModel") == "SPOT" or sched.get("preemptible") is True, name
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"], name
        assert t["min_workers"] == 0, f"{name}: idle GPUs should scale to zero"
    # Every VM runs as one of our own service accounts (not the project's default compute account).
    for name, t in types.items():
        accounts = t["node_config"].get("serviceAccounts") or []
        assert accounts, f"{name}: no serviceAccounts (it would run as the default compute account)"
        for acc in accounts:
            assert acc["email"].endswith(".iam.gserviceaccount.com") and "compute@developer" not in acc["email"]
    assert "roles/storage.objectUser" in text, "the least bucket role should be documented"


# --------------------------------------------------------------------------------------------------------
# 3. Job commands in docs and manifests exist in the jobs' parsers

CMD_RE = re.compile(r"\bpython3?\s+(?:[\w./-]*/)?jobs/([A-Za-z_]\w*)\.py(?![\w.])")
PLACEHOLDER_RE = re.compile(r"\$\([^()]*\)|\$\{[^}]*\}|\$[A-Za-z_]\w*|<[A-Za-z_][\w-]*>")
DUMMY = "1"  # stands for a shell variable or a <placeholder>; valid as an int, a float, a path or a name
SHELL_PUNCT = set("();<>|&")


class ParseFailure(Exception):
    pass


def join_continuations(text: str) -> list[tuple[int, str]]:
    """Logical lines (1-based line number of their first physical line) with `\\` continuations joined."""
    out, buf, start = [], [], None
    for n, line in enumerate(text.splitlines(), 1):
        if start is None:
            start = n
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            buf.append(stripped[:-1])
            continue
        buf.append(line)
        out.append((start, " ".join(buf)))
        buf, start = [], None
    if buf:
        out.append((start, " ".join(buf)))
    return out


def yaml_strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from yaml_strings(k)
            yield from yaml_strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from yaml_strings(v)


def command_lines(path: Path) -> list[tuple[str, str]]:
    """(where, logical line) pairs of a file in which to look for job commands.

    Markdown and other text: every logical line. YAML: every string value (folded and literal scalars
    arrive joined by the YAML parser) and every comment line (commands shown in comments count too).
    """
    text = path.read_text()
    if path.suffix not in (".yaml", ".yml"):
        return [(f"{rel(path)}:{n}", line) for n, line in join_continuations(text)]
    found = []
    for value in (s for doc in load_docs(path) for s in yaml_strings(doc)):
        found += [(f"{rel(path)} (YAML value)", line) for _, line in join_continuations(value)]
    comments = "\n".join(line.lstrip()[1:] if line.lstrip().startswith("#") else "" for line in text.splitlines())
    found += [(f"{rel(path)}:{n} (comment)", line) for n, line in join_continuations(comments)]
    return found


def tokens_of(args: str) -> list[str]:
    """The arguments of one command line as the shell would pass them (placeholders -> a dummy value)."""
    args = args.split("`", 1)[0]                                  # end of a Markdown code span
    args = PLACEHOLDER_RE.sub(DUMMY, args)
    args = re.sub(r"(?<!\S)\[|\](?!\S)", " ", args)               # optional parts in usage lines: [--ids CSV]
    lex = shlex.shlex(args, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    tokens = []
    for tok in lex:
        if tok and set(tok) <= SHELL_PUNCT:                       # ; && || | > ( ): the command ends
            break
        tokens.append(tok)
    return tokens


def extract_commands(path: Path) -> list[tuple[str, str, list[str]]]:
    """(where, script name, argument tokens) of every `python jobs/<script>.py ...` in a file."""
    commands = []
    for where, line in command_lines(path):
        for m, args in command_matches(line):
            try:
                tokens = tokens_of(args)
            except ValueError as e:                               # unbalanced quotes
                tokens = [f"<unparsable: {e}>"]
            commands.append((where, m.group(1), tokens))
    return commands


def command_matches(line: str):
    """(match, argument text) of each job command in a line; a command's arguments end where the next begins."""
    matches = list(CMD_RE.finditer(line))
    for m, nxt in zip(matches, matches[1:] + [None]):
        yield m, line[m.end():nxt.start() if nxt else len(line)]


@functools.lru_cache(maxsize=None)
def job_module(script: str):
    path = REPO / "jobs" / f"{script}.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"_infra_check_job_{script}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


def command_problems(script: str, tokens: list[str]) -> list[str]:
    """Why the job's own parser would reject these arguments ([] if it accepts them)."""
    module = job_module(script)
    if module is None:
        return [f"jobs/{script}.py does not exist"]
    if not hasattr(module, "get_args_parser"):
        return [f"jobs/{script}.py has no get_args_parser()"]
    parser = module.get_args_parser()
    known = parser._option_string_actions
    # Exact names only: argparse would also accept an unambiguous prefix, which breaks when a flag is added.
    unknown = [t.split("=", 1)[0] for t in tokens if t.startswith("-") and not is_number(t)]
    unknown = [f for f in unknown if f not in known]
    if unknown:
        return [f"jobs/{script}.py has no flag {f}" for f in unknown]
    if "-h" in tokens or "--help" in tokens:
        return []

    def error(message):
        raise ParseFailure(message)

    parser.error = error
    try:
        parser.parse_args(tokens)
    except ParseFailure as e:
        return [f"jobs/{script}.py rejects the arguments: {e}"]
    return []


def problems_in(path: Path) -> list[str]:
    return [f"{where}: {p}  [python jobs/{script}.py {' '.join(tokens)}]"
            for where, script, tokens in extract_commands(path)
            for p in command_problems(script, tokens)]


COMMAND_FILES = YAML_FILES + DOC_FILES


@pytest.mark.parametrize("path", COMMAND_FILES, ids=[rel(p) for p in COMMAND_FILES])
def test_job_commands_use_existing_jobs_and_flags(path):
    problems = problems_in(path)
    assert not problems, "job commands that would fail:\n" + "\n".join(problems)


@pytest.mark.parametrize("path, scripts", [
    (GCP_DOC, {"train", "tune", "predict", "check_data"}),
    (K8S / "rayjob-train.yaml", {"train"}),
    (K8S / "rayjob-tune.yaml", {"tune"}),
    (README, {"train", "predict"}),
], ids=lambda x: rel(x) if isinstance(x, Path) else "")
def test_commands_are_found_where_expected(path, scripts):
    """Guards the extractor: a file that runs jobs must yield those commands (no silent zero matches)."""
    found = {script for _, script, _ in extract_commands(path)}
    assert scripts <= found, f"{rel(path)}: expected commands of {sorted(scripts)}, found {sorted(found)}"


def test_command_check_detects_unknown_flags_and_scripts(tmp_path):
    """Negative self-check: made-up flags and scripts are reported with the file and the flag."""
    doc = tmp_path / "doc.md"
    doc.write_text("Run it:\n\n```bash\npython jobs/train.py --data gs://$BUCKET/x \\\n"
                   "    --output \"${OUT:-runs}/r1\" --definitely-not-a-flag 3  # comment\n"
                   "python jobs/no_such_job.py --data x\n```\n"
                   "Inline: `python jobs/train.py --epochs 2 --made-up-too` and [--fake] prose.\n")
    problems = problems_in(doc)
    assert any("doc.md:4" in p and "--definitely-not-a-flag" in p for p in problems), problems
    assert any("--made-up-too" in p for p in problems), problems
    assert any("no_such_job.py does not exist" in p for p in problems), problems
    assert not any("--fake" in p for p in problems), "prose after the code span is not part of the command"

    manifest = tmp_path / "job.yaml"
    manifest.write_text("spec:\n  entrypoint: >-\n    python jobs/train.py --data gs://b/x\n"
                        "    --epochs 2 --bogus-flag 1\n# ray job submit -- python jobs/train.py --also-bogus\n")
    problems = problems_in(manifest)
    assert any("job.yaml (YAML value)" in p and "--bogus-flag" in p for p in problems), problems
    assert any("job.yaml:5 (comment)" in p and "--also-bogus" in p for p in problems), problems

    two = tmp_path / "two.md"
    two.write_text("python jobs/train.py --epochs 2 && python jobs/predict.py --checkpoint r --output o --nope\n")
    problems = problems_in(two)
    assert len(problems) == 1 and "predict.py has no flag --nope" in problems[0], problems

    good = tmp_path / "good.md"
    good.write_text("python jobs/train.py --data gs://$BUCKET/c --output ${OUT} --epochs 2 && echo done\n")
    assert problems_in(good) == []
    # A value the parser refuses (a type error) is caught too, not only unknown names.
    assert command_problems("train", ["--epochs", "many"])


def flag_values(tokens: list[str]) -> dict[str, tuple[str, ...]]:
    out, flag = {}, None
    for t in tokens:
        if t.startswith("--"):
            flag, _, value = t.partition("=")
            out[flag] = (value,) if value else ()
        elif flag is not None:
            out[flag] += (t,)
    return out


@pytest.mark.parametrize("script, manifest", [("train", "rayjob-train.yaml"), ("tune", "rayjob-tune.yaml")])
def test_rayjob_entrypoints_match_the_gcp_readme(script, manifest):
    """The KubeRay jobs run the same command, flag for flag, as `ray job submit` in the GCP walk-through."""
    bucket = re.search(r"gs://([\w.-]+)/comp5329", (K8S / manifest).read_text()).group(1)
    readme = GCP_DOC.read_text().replace("$BUCKET", bucket)
    tmp = [(w, s, t) for w, s, t in extract_commands(K8S / manifest) if s == script]
    assert len(tmp) == 1, tmp
    doc_cmds = []
    for where, line in join_continuations(readme):
        for m, args in command_matches(line):
            if m.group(1) == script and "gs://" in args:
                doc_cmds.append(flag_values(tokens_of(args)))
    assert doc_cmds, f"no {script} command on a bucket in {rel(GCP_DOC)}"
    assert flag_values(tmp[0][2]) in doc_cmds, (flag_values(tmp[0][2]), doc_cmds)


# --------------------------------------------------------------------------------------------------------
# 4. Dockerfile, .dockerignore, manifests agree

CREDENTIAL_RE = re.compile(r"(\.pem$|\.key$|id_rsa|id_ed25519|credential|service[-_]?account.*\.json|-key\.json$|"
                           r"auth_token|\.ray(/|$)|\.config/gcloud|\.kube|\.docker/config|\.env$|\.netrc)", re.I)
SECRET_NAME_RE = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|(^|_)KEY($|_)", re.I)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    lines = [l for l in DOCKERFILE.read_text().splitlines() if not l.lstrip().startswith("#")]
    out = []
    for _, line in join_continuations("\n".join(lines)):
        if line.strip():
            word, _, args = line.strip().partition(" ")
            out.append((word.upper(), args.strip()))
    return out


def dockerfile_ray_version() -> str:
    for word, args in dockerfile_instructions():
        if word == "ARG" and args.startswith("RAY_VERSION="):
            return args.split("=", 1)[1].strip().strip('"')
    raise AssertionError("Dockerfile has no ARG RAY_VERSION=<version>")


def test_dockerfile_installs_from_pyproject_only():
    runs = [args for word, args in dockerfile_instructions() if word == "RUN"]
    installs = []
    for run in runs:
        for m in re.finditer(r"\bpip3?\s+install\b([^&|;]*)", run):
            installs.append(m.group(1).split())
    assert installs, "the Dockerfile installs nothing with pip"
    for args in installs:
        assert not {"-r", "--requirement", "-c", "--constraint"} & set(args), f"pip install {' '.join(args)}"
        targets = [a for a in args if not a.startswith("-")]
        assert targets and all(re.fullmatch(r"\.(\[[\w,-]+\])?", t) for t in targets), (
            f"pip install {' '.join(args)}: only the project itself (`.`), whose pyproject.toml lists the "
            "dependencies, may be installed")
    instructions = " ".join(args for _, args in dockerfile_instructions())
    assert "requirements" not in instructions.lower(), "a second dependency list next to pyproject.toml"
    copies = [args for word, args in dockerfile_instructions() if word in ("COPY", "ADD")]
    assert any("pyproject.toml" in c for c in copies), "pyproject.toml is not copied into the image"


def test_dockerfile_copies_no_credentials():
    for word, args in dockerfile_instructions():
        if word in ("COPY", "ADD"):
            parts = [p for p in args.split() if not p.startswith("--")]
            sources = parts[:-1]
            assert sources, f"{word} {args}"
            for src in sources:
                assert src not in (".", "./", "*"), f"{word} {args}: copy named files, not the whole context"
                assert not CREDENTIAL_RE.search(src), f"{word} {args}: looks like a credential"
                assert "://" not in src, f"{word} {args}: no downloads into the image"
        if word in ("ARG", "ENV"):
            for name in re.findall(r"(?:^|\s)([A-Za-z_]\w*)(?==|\s|$)", args):
                assert not SECRET_NAME_RE.search(name), f"{word} {args}: secrets are passed at run time, not built in"
    instructions = " ".join(args for _, args in dockerfile_instructions())
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in instructions, "bucket access is the node's identity, not a key"


def test_dockerfile_ray_version_matches_this_environment_and_pyproject():
    """The image's Ray is the client's Ray (ray up / ray job submit need the same version) and in range."""
    import ray
    from packaging.requirements import Requirement
    version = dockerfile_ray_version()
    assert version == ray.__version__, (
        f"infra/docker/Dockerfile builds Ray {version} but this environment has {ray.__version__}; "
        "update ARG RAY_VERSION (and the image tags in infra/)")
    # The dependency strings of pyproject.toml (no tomllib: Python 3.10 is supported too).
    deps = re.findall(r'^\s*"([^"]+)",?\s*(?:#.*)?$', (REPO / "pyproject.toml").read_text(), re.M)
    ray_req = next(Requirement(d) for d in deps if re.match(r"ray\W", d))
    assert ray_req.specifier.contains(version), f"Ray {version} is outside pyproject's {ray_req}"
    froms = [args for word, args in dockerfile_instructions() if word == "FROM"]
    assert froms and "${RAY_VERSION}" in froms[0], froms


def test_dockerignore_excludes_environments_vcs_and_secrets():
    patterns = {l.strip().strip("/").removeprefix("**/") for l in DOCKERIGNORE.read_text().splitlines()
                if l.strip() and not l.startswith("#")}
    for must in (".venv", ".git", "runs", "*.pem", "auth_token"):
        assert must in patterns, f".dockerignore does not exclude {must}"


def k8s_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(K8S.glob("*.yaml")) for d in load_docs(p)]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    specs = []
    for path, doc in k8s_docs():
        if doc.get("kind") == "RayCluster":
            specs.append((rel(path), doc["spec"]))
        elif doc.get("kind") == "RayJob":
            specs.append((rel(path), doc["spec"]["rayClusterSpec"]))
    return specs


def test_k8s_manifests_agree_and_request_gpus():
    version = dockerfile_ray_version()
    accounts = [d for _, d in k8s_docs() if d.get("kind") == "ServiceAccount"]
    assert len(accounts) == 1, "one Kubernetes ServiceAccount for the Ray pods"
    ksa = accounts[0]
    gsa = ksa["metadata"].get("annotations", {}).get("iam.gke.io/gcp-service-account", "")
    assert gsa.endswith(".iam.gserviceaccount.com"), "the ServiceAccount needs its Workload Identity annotation"

    specs = ray_cluster_specs()
    assert {where for where, _ in specs} >= {"infra/k8s/raycluster.yaml", "infra/k8s/rayjob-train.yaml",
                                             "infra/k8s/rayjob-tune.yaml"}
    images = set()
    for where, spec in specs:
        assert spec.get("rayVersion") == version, f"{where}: rayVersion {spec.get('rayVersion')} != {version}"
        assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: Ray token auth is off"
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: the head must not be exposed"
        assert str(head["rayStartParams"].get("num-cpus")) == "0", f"{where}: the head must take no Ray work"
        templates = [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for t in templates:
            assert t["spec"].get("serviceAccountName") == ksa["metadata"]["name"], f"{where}: pod without {ksa}"
            for c in t["spec"]["containers"]:
                images.add(c["image"])
                for env in c.get("env", []):
                    assert env["name"] != "GOOGLE_APPLICATION_CREDENTIALS", f"{where}: key file in use"
                    assert not (env["name"] == "RAY_AUTH_TOKEN" and "value" in env), f"{where}: literal token"
            for vol in t["spec"].get("volumes", []):
                assert "secret" not in vol, f"{where}: mounted secret volume {vol['name']} (key file?)"
        assert spec["workerGroupSpecs"], f"{where}: no worker group"
        for g in spec["workerGroupSpecs"]:
            assert 0 <= g["minReplicas"] <= g["maxReplicas"], f"{where}: {g['groupName']} replicas"
            for c in g["template"]["spec"]["containers"]:
                limits = c.get("resources", {}).get("limits", {})
                assert int(limits.get("nvidia.com/gpu", 0)) >= 1, f"{where}: {g['groupName']} requests no GPU"
    assert len(images) == 1, f"the k8s manifests use different images: {images}"
    image = images.pop()
    assert image.endswith(f":ray{version}"), f"image tag {image} should carry the Ray version {version}"
    gce_image = yaml.safe_load(CLUSTER.read_text())["docker"]["image"]
    assert gce_image == image, f"GCE image {gce_image} != k8s image {image}"


SCANNED = YAML_FILES + DOC_FILES + [DOCKERFILE, DOCKERIGNORE]


@pytest.mark.parametrize("path", SCANNED, ids=[rel(p) for p in SCANNED])
def test_no_secret_material_in_infra_files(path):
    text = path.read_text()
    assert not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", text)
    assert '"private_key"' not in text and "private_key_id" not in text
    assert not re.search(r"AIza[0-9A-Za-z_-]{35}", text), "a Google API key"
    assert not re.search(r"RAY_AUTH_TOKEN\s*=\s*['\"]?[A-Za-z0-9]", text), "a literal Ray token"


# --------------------------------------------------------------------------------------------------------
# 5. The shipped commands plan on the shipped clusters as they scale from zero


def k8s_node_types(spec: dict) -> dict:
    """MLC_NODE_TYPES on the head container, parsed."""
    import json
    for c in spec["headGroupSpec"]["template"]["spec"]["containers"]:
        for env in c.get("env", []):
            if env["name"] == "MLC_NODE_TYPES":
                return json.loads(env["value"])
    raise AssertionError("the head container sets no MLC_NODE_TYPES")


def test_k8s_head_declares_the_worker_groups_node_types():
    """The drivers plan from MLC_NODE_TYPES (KubeRay's autoscaler config is out of their reach): it must say
    what workerGroupSpecs say, in Ray's terms (CPUs and GPUs from the pod limits, maxReplicas)."""
    for where, spec in ray_cluster_specs():
        declared = k8s_node_types(spec)
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert set(declared) == set(groups), f"{where}: MLC_NODE_TYPES {set(declared)} != groups {set(groups)}"
        for name, g in groups.items():
            limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
            want = {"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}
            got = {k: float(v) for k, v in declared[name]["resources"].items()}
            assert got == want, f"{where}: {name} declares {got}, the pod limits give {want}"
            assert declared[name]["max_workers"] == g["maxReplicas"], f"{where}: {name} max_workers"


def _shipped_cluster(source: str):
    from mlc.distributed.cluster import Cluster, types_from_config
    if source == "gce":
        types = types_from_config(yaml.safe_load(CLUSTER.read_text()))
    else:
        types = types_from_config({"available_node_types": k8s_node_types(ray_cluster_specs()[0][1])})
    return Cluster(({"CPU": 0.0},), types, source)  # scale from zero: the 0-CPU head is all there is


@pytest.mark.parametrize("source", ["gce", "k8s"])
def test_shipped_train_and_tune_commands_plan_gpu_workers_on_a_cluster_with_no_worker_node(source):
    from mlc.distributed import cluster
    from mlc.cli import scale_from_args, sweep_from_args
    c = _shipped_cluster(source)
    files = DOC_FILES + sorted(K8S.glob("rayjob-*.yaml"))
    seen = set()
    for path in files:
        for where, script, tokens in extract_commands(path):
            if script not in ("train", "tune") or not any(t.startswith("gs://") for t in tokens):
                continue
            args = job_module(script).get_args_parser().parse_args(tokens)
            conf = scale_from_args(args) if script == "train" else sweep_from_args(args)
            needed = conf.min_workers if script == "train" else conf.workers_per_trial
            per_worker = cluster.choose_resources(c, conf.gpus_per_worker, conf.cpus_per_worker, wait=False)
            assert per_worker.get("GPU") == 1.0, f"{where}: {per_worker}"
            assert per_worker["CPU"] == (8.0 if source == "gce" else 7.0), f"{where}: {per_worker}"
            cluster.check_feasible(c, per_worker, needed, what=where, wait=False)  # raises if it never fits
            seen.add(script)
    assert seen == {"train", "tune"}
    # And the plan refuses what the node types can never hold, at once.
    with pytest.raises(cluster.ClusterError, match="at most 4"):
        cluster.check_feasible(c, {"CPU": 1.0, "GPU": 1.0}, 5, what="x", wait=False)


def _drain_command(text: str) -> dict:
    """The options of a `ray drain-node` command line (shell text)."""
    words = text.replace("\\\n", " ").split()
    start = words.index("drain-node")
    out = {}
    for k, w in enumerate(words[start + 1:], start + 1):
        if w.startswith("--") and k + 1 < len(words):
            out[w] = words[k + 1].rstrip(";")
    return out


def _cluster_commands_parse_with_rays_cli(opts: dict) -> None:
    """The reason is one Ray's CLI accepts, and the deadline is a whole number of seconds."""
    from ray.core.generated import autoscaler_pb2
    assert opts["--reason"] == "DRAIN_NODE_REASON_PREEMPTION"
    assert opts["--reason"] in autoscaler_pb2.DrainNodeReason.keys()
    int(opts["--deadline-remaining-seconds"])


def test_spot_gce_workers_drain_their_node_as_preempted_before_the_vm_goes():
    """GCE powers a reclaimed Spot VM off 30 s after its notice and runs the shutdown script first: the script
    drains the VM's own Ray node as preempted, with a deadline inside those 30 s."""
    worker = yaml.safe_load(CLUSTER.read_text())["available_node_types"]["ray_worker_gpu"]["node_config"]
    assert worker["scheduling"]["provisioningModel"] == "SPOT"
    items = {i["key"]: i["value"] for i in worker["metadata"]["items"]}
    script = items["shutdown-script"]
    assert script.startswith("#!/bin/bash") and "docker exec ray_container ray drain-node" in script
    opts = _drain_command(script)
    _cluster_commands_parse_with_rays_cli(opts)
    assert 10 <= int(opts["--deadline-remaining-seconds"]) <= 28  # inside the 30 s, with time for the script
    assert "--node-id" not in opts  # its own node: the one the container runs


def test_spot_pods_drain_their_node_as_preempted_and_live_until_the_deadline():
    """Every worker pod of the k8s manifests: a preStop hook that drains its Ray node as preempted, then keeps the
    pod alive until the deadline (SIGTERM comes only after preStop), all inside terminationGracePeriodSeconds."""
    for where, spec in ray_cluster_specs():
        for g in spec["workerGroupSpecs"]:
            pod = g["template"]["spec"]
            (container,) = [c for c in pod["containers"] if c["name"] == "ray-worker"]
            command = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
            opts = _drain_command(command)
            _cluster_commands_parse_with_rays_cli(opts)
            deadline = int(opts["--deadline-remaining-seconds"])
            sleep = int(command.rsplit("sleep", 1)[1].split()[0])
            assert sleep >= deadline - 2, f"{where}: preStop returns before the deadline"
            assert pod["terminationGracePeriodSeconds"] >= sleep + 5, f"{where}: the grace period ends first"
            assert pod["terminationGracePeriodSeconds"] <= 30, f"{where}: longer than GKE Spot gives"
