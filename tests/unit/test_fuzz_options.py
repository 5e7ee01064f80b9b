"""Property-based fuzzing of everything that parses a caller's input before a model runs (no Triton, no torch).

The capability layer's ``textToImage`` options, prompt, capability id and mint parameters, and the server's
raw-tensor request parsing each get arbitrary JSON-like values or arrays: huge and negative integers, bools
where integers go, NaN and infinities, strings with NUL, lone surrogates or megabytes, nested objects, wrong
dtypes and shapes. The property each time: the input is accepted and every accepted value lies within the
documented rule, or the layer's own error is raised naming the field, never any other exception.

Hypothesis runs derandomized and keeps no example database, so a CI run is reproducible and leaves nothing in
the tree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from capability import CapabilityError, CapabilityLayer, DeniedError, InvalidOptionError, InvalidParamsError
from capability.capabilities import GenerateParams, canonical_server_url
from capability.errors import UnknownServerError
from capability.generation import (
    MAX_GUIDANCE_SCALE,
    MAX_MODEL_ID_LENGTH,
    MAX_PROMPT_BYTES,
    MAX_SIDE,
    MAX_STEPS,
    OPTION_NAMES,
    SIZE_MULTIPLE,
    check_prompt,
    parse_options,
)
from diffusers_backend.errors import InvalidRequestError
from diffusers_backend.validation import GenerationRequest, RequestLimits, parse_request
from inference_client.contract import MAX_SEED

FUZZ = settings(
    max_examples=250,
    deadline=None,  # a multi-megabyte example takes longer on a busy CI machine; that is not a failure
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
# Hypothesis warns when it renders a multi-megabyte example for its report; those examples are the point here.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr:hypothesis.errors.HypothesisWarning")
Result = TypeVar("Result")
UNUSED_SERVER = "http://127.0.0.1:9"
"""No key is registered for it, so an accepted request stops at UnknownServerError: nothing is ever sent."""

# --- hostile JSON-like values ----------------------------------------------------------------------------------

MEGABYTE_STRINGS = st.sampled_from(["x" * 3_000_000, "é" * 600_000, "\x00" * 1_000_000, " " * 2_000_000,
                                    "a" * (MAX_PROMPT_BYTES + 1)])
LONE_SURROGATES = st.characters(categories=["Cs"])
HOSTILE_TEXT = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.one_of(st.characters(), LONE_SURROGATES, st.just("\x00")), max_size=30),
    MEGABYTE_STRINGS,
)
HUGE_INTEGERS = st.sampled_from([2**31, -(2**31) - 1, 2**53 + 1, 2**63, 2**64, 10**400, -(10**400)])
SPECIAL_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), HUGE_INTEGERS, st.floats(), SPECIAL_FLOATS,
                    HOSTILE_TEXT, st.binary(max_size=8))
JSON_VALUES = st.recursive(
    SCALARS, lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children,
                                                                                 max_size=3),
    max_leaves=8,
)


def plausible(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Valid values half the time, so that the accepted branch is exercised as hard as the refusals."""
    return st.one_of(valid, JSON_VALUES)


OPTION_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "width": plausible(st.integers(-2, MAX_SIDE // SIZE_MULTIPLE + 2).map(lambda n: n * SIZE_MULTIPLE)),
    "height": plausible(st.integers(-2, MAX_SIDE // SIZE_MULTIPLE + 2).map(lambda n: n * SIZE_MULTIPLE)),
    "numInferenceSteps": plausible(st.integers(-1, MAX_STEPS + 1)),
    "guidanceScale": plausible(st.one_of(st.floats(-1, MAX_GUIDANCE_SCALE + 1), st.integers(-1, 101))),
    "negativePrompt": plausible(st.text(max_size=40)),
    "seed": plausible(st.integers(-1, MAX_SEED + 1)),
    "modelId": plausible(st.sampled_from(["tiny-sd15", "stabilityai/sdxl-turbo", "m" * MAX_MODEL_ID_LENGTH])),
}
UNKNOWN_OPTIONS = st.dictionaries(
    st.one_of(st.sampled_from(["widht", "steps", "prompt", "Width", "guidance_scale"]), HOSTILE_TEXT)
    .filter(lambda name: name not in OPTION_NAMES),
    JSON_VALUES, min_size=1, max_size=2,
)


@st.composite
def option_dicts(draw: st.DrawFn) -> dict[str, Any]:
    options: dict[str, Any] = draw(st.fixed_dictionaries({}, optional=OPTION_VALUES))
    if draw(st.integers(0, 3)) == 0:  # mostly known names only: an unknown one hides every other check
        options.update(draw(UNKNOWN_OPTIONS))
    return options


# --- the rules, restated from the documentation -----------------------------------------------------------------


def attempt(call: Callable[[], Result], refusal: type[Exception]) -> tuple[Result | None, Exception | None]:
    """The result, or the refusal raised; any other exception propagates and fails the property."""
    try:
        return call(), None
    except refusal as error:
        return None, error


def is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def assert_accepted_within_rules(options: Mapping[str, Any], parsed: Any) -> None:
    assert set(options) <= set(OPTION_NAMES)
    for option, field in (("width", "width"), ("height", "height"), ("numInferenceSteps", "steps"),
                          ("seed", "seed")):
        value = getattr(parsed, field)
        assert value == options.get(option)
        if value is not None:
            assert is_integer(value)
    for side in (parsed.width, parsed.height):
        if side is not None:
            assert SIZE_MULTIPLE <= side <= MAX_SIDE
            assert side % SIZE_MULTIPLE == 0
    if parsed.steps is not None:
        assert 1 <= parsed.steps <= MAX_STEPS
    if parsed.seed is not None:
        assert 0 <= parsed.seed <= MAX_SEED
    if parsed.guidance_scale is not None:
        assert type(parsed.guidance_scale) is float
        assert math.isfinite(parsed.guidance_scale)
        assert 0 <= parsed.guidance_scale <= MAX_GUIDANCE_SCALE
    if parsed.negative_prompt is not None:
        assert_usable_text(parsed.negative_prompt)
    if parsed.model_id is not None:
        assert parsed.model_id.isprintable()
        assert parsed.model_id.strip()
        assert len(parsed.model_id) <= MAX_MODEL_ID_LENGTH


def assert_usable_text(text: object) -> None:
    assert isinstance(text, str)
    assert len(text.encode("utf-8")) <= MAX_PROMPT_BYTES  # raises on a lone surrogate
    assert "\x00" not in text


def assert_names_the_option(error: Exception | None, options: Mapping[str, Any]) -> None:
    assert isinstance(error, InvalidOptionError)
    assert error.option in options, error.option
    # A short plain name is shown as is, any other key quoted (and cut) so that it cannot bloat the message.
    shown = error.option if error.option.isidentifier() and len(error.option) <= 64 else repr(error.option)[:48]
    assert str(error).startswith(shown), (shown[:60], str(error)[:120])
    assert len(str(error)) < 1000  # a megabyte value or key is described, never copied into the message


# --- capability layer ------------------------------------------------------------------------------------------


@FUZZ
@given(options=option_dicts())
def test_parse_options_accepts_only_values_within_the_rules_and_names_the_option_otherwise(
    options: dict[str, Any],
) -> None:
    parsed, refusal = attempt(lambda: parse_options(options), InvalidOptionError)
    if refusal is not None:
        assert_names_the_option(refusal, options)
    else:
        assert_accepted_within_rules(options, parsed)


@FUZZ
@given(prompt=st.one_of(HOSTILE_TEXT, JSON_VALUES))
def test_check_prompt_returns_usable_visible_text_or_names_the_prompt(prompt: Any) -> None:
    checked, refusal = attempt(lambda: check_prompt(prompt), InvalidOptionError)
    if refusal is not None:
        assert_names_the_option(refusal, {"prompt": prompt})
    else:
        assert checked is prompt
        assert_usable_text(checked)
        assert isinstance(checked, str)
        assert checked.strip()


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CapabilityLayer]:
    with CapabilityLayer(tmp_path_factory.mktemp("state")) as layer:
        yield layer


@pytest.fixture(scope="module")
def limited(layer: CapabilityLayer) -> Any:
    """A capability with every limit set, so that the grant check is fuzzed too."""
    authority = layer.create_authority("admin")
    return layer.mint("admin", authority.id, {
        "server_url": UNUSED_SERVER, "default_model": "tiny-sd15", "allowed_models": ["tiny-sd15", "tiny-sdxl"],
        "max_width": 512, "max_height": 512, "max_steps": 8})


def within_the_limited_capability(parsed: Any) -> bool:
    sides_and_steps = ((parsed.width, 512), (parsed.height, 512), (parsed.steps, 8))
    return (all(value is not None and value <= limit for value, limit in sides_and_steps)
            and parsed.model_id in (None, "tiny-sd15", "tiny-sdxl"))


@FUZZ
@given(prompt=st.one_of(st.just("a red cube"), HOSTILE_TEXT), options=st.one_of(st.none(), option_dicts()))
def test_text_to_image_refuses_with_a_capability_error_and_audits_it_whatever_the_options(
    layer: CapabilityLayer, limited: Any, prompt: Any, options: dict[str, Any] | None,
) -> None:
    audited = len(layer.capabilities.audit_log("admin", limited.id))
    with pytest.raises(CapabilityError) as caught:
        limited.text_to_image(prompt, options)
    error = caught.value
    if isinstance(error, InvalidOptionError):
        assert_names_the_option(error, {**(options or {}), "prompt": prompt})
    elif isinstance(error, DeniedError):
        # Beyond the capability: only options within the general rules get this far.
        parsed = parse_options(options)
        assert_accepted_within_rules(options or {}, parsed)
        assert not within_the_limited_capability(parsed)
    else:
        # Every check passed: the request stopped where the server would be contacted.
        assert isinstance(error, UnknownServerError), repr(error)
        assert within_the_limited_capability(parse_options(options))
    # Every refusal is in the audit log, however hostile the text it quotes.
    assert len(layer.capabilities.audit_log("admin", limited.id)) == audited + 1


@FUZZ
@given(capability_id=st.one_of(HOSTILE_TEXT, JSON_VALUES, st.just("cap_")),
       entity=st.one_of(st.just("admin"), HOSTILE_TEXT))
def test_text_to_image_denies_any_capability_id_it_was_not_given(
    layer: CapabilityLayer, capability_id: Any, entity: str
) -> None:
    with pytest.raises(DeniedError, match="not held by"):
        layer.handle(entity, capability_id).text_to_image("a red cube", {"width": 64})


MINT_PARAMS = st.fixed_dictionaries({}, optional={
    "server_url": plausible(st.sampled_from([UNUSED_SERVER, "https://Example.org", "http://[::1]:8000",
                                             "http://127.0.0.1:0", "ftp://127.0.0.1", "http://a b"])),
    "default_model": plausible(st.just("tiny-sd15")),
    "allowed_models": plausible(st.lists(st.sampled_from(["tiny-sd15", "tiny-sdxl"]), max_size=2)),
    "max_concurrent": plausible(st.integers(-1, 4)),
    "max_width": plausible(st.integers(-1, 1024)),
    "max_height": plausible(st.integers(-1, 1024)),
    "max_steps": plausible(st.integers(-1, 50)),
    "expires_at": plausible(st.floats(0, 2e9)),
}).flatmap(lambda known: st.one_of(st.just(known), UNKNOWN_OPTIONS.map(lambda extra: {**known, **extra})))


@FUZZ
@given(params=MINT_PARAMS)
def test_mint_grants_only_well_formed_parameters_and_refuses_the_rest_with_invalid_params(
    layer: CapabilityLayer, params: dict[str, Any]
) -> None:
    authority = layer.capabilities.create_authority("minter")
    minted, refusal = attempt(lambda: layer.capabilities.mint("minter", authority.id, params), InvalidParamsError)
    if minted is None:
        # Described, not copied: the message (and the audit record made of it) stays small.
        assert len(str(refusal)) < 1000
        return
    stored = GenerateParams.parse(minted.params)  # what is stored parses back as it is
    assert stored.server_url == canonical_server_url(params["server_url"])
    for name in GenerateParams.LIMITS:
        limit = getattr(stored, name)
        assert limit == params.get(name)
        if limit is not None:
            assert is_integer(limit)
            assert limit >= 1
    if stored.allowed_models is not None:
        assert stored.default_model in stored.allowed_models
    assert minted.expires_at is None or math.isfinite(minted.expires_at)


def test_parse_options_names_guidance_scale_when_it_is_an_integer_beyond_any_float() -> None:
    with pytest.raises(InvalidOptionError, match="guidanceScale"):
        parse_options({"guidanceScale": 10**400})


@pytest.mark.parametrize("options", ["ab", 42, [1]])
def test_parse_options_refuses_options_that_are_not_a_mapping_with_invalid_option(options: Any) -> None:
    with pytest.raises(InvalidOptionError, match=r"options=.* is invalid: must be a mapping"):
        parse_options(options)


def test_audit_records_a_refusal_when_the_capability_id_holds_a_lone_surrogate(layer: CapabilityLayer) -> None:
    # Undecodable command-line bytes become lone surrogates; SQLite cannot bind them as they are.
    with pytest.raises(DeniedError):
        layer.handle("admin", "cap_\udcff").text_to_image("a red cube")
    with pytest.raises(DeniedError):
        layer.capabilities.audit_log("admin", "cap_\udcff")
    assert layer.capabilities.owned("ad\udcffmin") == []


def test_invalid_option_message_quotes_and_cuts_an_unknown_option_name_when_it_is_hostile() -> None:
    with pytest.raises(InvalidOptionError) as caught:
        parse_options({"w\udce9" + "x" * 3_000_000: 1})
    message = str(caught.value)
    assert message.startswith("'w\\udce9xxx")
    assert len(message) < 300
    message.encode("utf-8")  # storable: no lone surrogate left


def test_mint_refuses_an_expiry_beyond_any_float_with_invalid_params(layer: CapabilityLayer) -> None:
    authority = layer.capabilities.create_authority("minter")
    with pytest.raises(InvalidParamsError, match="expires_at="):
        layer.capabilities.mint("minter", authority.id, {"server_url": UNUSED_SERVER, "default_model": "m",
                                                         "expires_at": 10**400})


# --- the server's raw-tensor parsing (diffusers_backend/validation.py) ----------------------------------------------

SD15_LIKE = RequestLimits(
    family_name="sd15", size_multiple=8, default_width=512, default_height=512, max_width=2048, max_height=2048,
    default_steps=50, max_steps=100, default_guidance_scale=7.5, max_guidance_scale=30.0, uses_guidance_scale=True,
    takes_negative_prompt=True, negative_prompt_needs_guidance=True, max_prompt_bytes=4096,
)
SCHNELL_LIKE = RequestLimits(
    family_name="flux", size_multiple=16, default_width=1024, default_height=1024, max_width=2048,
    max_height=2048, default_steps=4, max_steps=100, default_guidance_scale=0.0, max_guidance_scale=30.0,
    uses_guidance_scale=False, takes_negative_prompt=False, negative_prompt_needs_guidance=False,
    max_prompt_bytes=4096,
)
TENSOR_NAMES = ("PROMPT", "NEGATIVE_PROMPT", "WIDTH", "HEIGHT", "NUM_INFERENCE_STEPS", "GUIDANCE_SCALE", "SEED")
SHAPES = st.sampled_from([(1, 1), (1, 1), (1,), (), (2, 1), (1, 2), (0, 1), (4, 1)])
MEGABYTE_BYTES = st.sampled_from([b"x" * 3_000_000, b"\xff" * 1_000_000, b"a" * 4097, b"\x00" * 5000])
BYTE_STRINGS = st.one_of(st.text(max_size=20).map(lambda text: text.encode()), st.binary(max_size=20),
                         st.sampled_from([b"", b"   ", b"a\x00b", b"\xed\xa0\x80", b"caf\xe9"]), MEGABYTE_BYTES)
OBJECT_ELEMENTS = st.one_of(BYTE_STRINGS, st.text(max_size=5), st.integers(), st.none())
NUMERIC_DTYPES = st.sampled_from([np.int32, np.int64, np.uint64, np.int8, np.float32, np.float64, np.float16,
                                  np.bool_])


def right_typed(name: str) -> st.SearchStrategy[np.ndarray]:
    """A [1, 1] tensor of the contract's dtype holding an arbitrary value of that dtype."""
    if name in ("PROMPT", "NEGATIVE_PROMPT"):
        return hnp.arrays(np.object_, (1, 1), elements=BYTE_STRINGS)
    dtype = {"GUIDANCE_SCALE": np.float32, "SEED": np.int64}.get(name, np.int32)
    small = st.integers(0, 300) if dtype is not np.float32 else st.floats(0, 31, width=32)
    return st.one_of(hnp.arrays(dtype, (1, 1)), hnp.arrays(dtype, (1, 1), elements=small))


def any_tensor(name: str) -> st.SearchStrategy[np.ndarray]:
    return st.one_of(
        right_typed(name), right_typed(name),
        hnp.arrays(NUMERIC_DTYPES, SHAPES),
        hnp.arrays(np.object_, SHAPES, elements=OBJECT_ELEMENTS),
    )


TENSORS = st.fixed_dictionaries({}, optional={name: any_tensor(name) for name in TENSOR_NAMES})


def assert_request_within_limits(request: GenerationRequest, limits: RequestLimits) -> None:
    assert_usable_text(request.prompt)
    assert request.prompt.strip()
    if request.negative_prompt is not None:
        assert_usable_text(request.negative_prompt)
        assert limits.takes_negative_prompt
        assert request.guidance_scale > 1
    for side, maximum in ((request.width, limits.max_width), (request.height, limits.max_height)):
        assert is_integer(side)
        assert 0 < side <= maximum
        assert side % limits.size_multiple == 0
    assert is_integer(request.steps)
    assert 1 <= request.steps <= limits.max_steps
    assert type(request.guidance_scale) is float
    assert math.isfinite(request.guidance_scale)
    assert 0 <= request.guidance_scale <= limits.max_guidance_scale
    if not limits.uses_guidance_scale:
        assert request.guidance_scale == limits.default_guidance_scale
    assert is_integer(request.seed)
    assert 0 <= request.seed <= MAX_SEED


@FUZZ
@given(tensors=TENSORS, limits=st.sampled_from([SD15_LIKE, SCHNELL_LIKE]))
def test_parse_request_accepts_only_tensors_within_the_limits_and_names_the_field_otherwise(
    tensors: dict[str, np.ndarray], limits: RequestLimits
) -> None:
    request, refusal = attempt(lambda: parse_request(tensors, limits, seed_source=lambda: 7), InvalidRequestError)
    if request is None:
        assert isinstance(refusal, InvalidRequestError)
        # Named: a field the request sent, or the prompt it failed to send.
        assert refusal.field in tensors or refusal.field == "PROMPT", refusal.field
        assert str(refusal).startswith((f"{refusal.field}=", f"{refusal.field} is missing")), str(refusal)[:120]
        assert len(str(refusal)) < 1000
        return
    assert_request_within_limits(request, limits)
    if "SEED" not in tensors:
        assert request.seed == 7
