"""Checking one legacy record, field by field, into the values the staging table takes.

Every problem is an `Issue` with a stable code; a record with any error is not staged (it
fails as a whole: never a partial write). Warnings leave the record in.
"""

from __future__ import annotations

import operator
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from tollhouse.errors import InvalidEmail
from tollhouse.identity.emails import normalise_email
from tollhouse.imports.parse import COLUMNS, Header, RawRecord
from tollhouse.imports.report import Issue, shown

#: The default mapping of legacy tiers onto plans (version 1). `--plan-map OLD=NEW` adds
#: or overrides entries; `--plan-map =NEW` declares what an empty tier means (by default an
#: empty tier is an error). A tier not in the mapping is an error, never a silent default.
PLAN_MAP_V1: Mapping[str, str] = {
    "free": "free",
    "starter": "starter",
    "pro": "pro",
    "power": "power",
    "enterprise": "power",
}
#: What users.plan_override accepts (its CHECK): the only plans a tier may map onto.
OVERRIDE_PLANS = frozenset({"free", "starter", "pro", "power"})
PROVIDERS = ("google", "apple", "email")
STATUSES = ("active", "suspended", "disabled")
BILLING_STATUSES = ("active", "past_due", "canceled")
MAX_CREDITS = 10**15
_TRUE = frozenset({"true", "t", "yes", "y", "1", "on"})
_FALSE = frozenset({"false", "f", "no", "n", "0", "off"})
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_STRIPE_CUSTOMER = re.compile(r"cus_[A-Za-z0-9]{1,250}")
_STRIPE_SUBSCRIPTION = re.compile(r"sub_[A-Za-z0-9]{1,250}")
_SLASH_DATE = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{2,4})")
_SLASH_DATE_TIME = re.compile(
    r"(\d{1,2})/(\d{1,2})/(\d{4})(?:[ T](\d{1,2}):(\d\d)(?::(\d\d)(?:\.(\d{1,6}))?)?)?"
)
_EPOCH = re.compile(r"-?\d{1,11}")
# The common spellings PostgreSQL reads exactly as Python does: staged as written.
_ISO_ZONED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)")
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

#: The columns of the staged tuple, in order (the COPY column list).
STAGED = (
    "record_no",
    "line_no",
    "user_id",
    "email",
    "provider",
    "subject",
    "display_name",
    "created_at",
    "last_seen_at",
    "legacy_tier",
    "plan",
    "plan_override",
    "credits_total",
    "credits_remaining",
    "credits_balance",
    "daily_cap",
    "last_daily_reset",
    "period_end",
    "marketing",
    "status",
    "stripe_customer_id",
    "stripe_subscription_id",
    "billing_status",
)

Staged = tuple[str | None, ...]

#: `--date-format` values: how `nn/nn/yyyy` dates are read (`iso`: they are refused).
DATE_ORDERS = ("iso", "dmy", "mdy")


@dataclass(frozen=True)
class DateRules:
    """How the file's dates are read (RELIABILITY C-07). ISO 8601 is always accepted.

    - `order`: `iso` refuses `03/04/2021` as `ambiguous_date`; `dmy` reads it as 3 April,
      `mdy` as 4 March (a four-digit year, optionally followed by ` HH:MM[:SS]`).
    - `epoch`: a whole number is Unix seconds (UTC); otherwise it is `invalid_date`.
    - `time_zone`: the IANA zone of times written without an offset (a bare date is its
      midnight there); a local time that does not exist there (a DST gap) is `invalid_date`.
    """

    order: str = "iso"
    epoch: bool = False
    time_zone: str = "UTC"

    def __post_init__(self) -> None:
        if self.order not in DATE_ORDERS:
            raise ValueError(
                f"--date-format must be one of {', '.join(DATE_ORDERS)}, not {self.order!r}"
            )
        try:
            ZoneInfo(self.time_zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"--time-zone {self.time_zone!r} is not a known time zone") from None

    @property
    def zone(self) -> tzinfo:
        return UTC if self.time_zone == "UTC" else ZoneInfo(self.time_zone)

    def is_default(self) -> bool:
        return self == DateRules()


class _Bad(Exception):
    """One field's error, raised inside a check and turned into an Issue."""

    def __init__(self, code: str, message: str, column: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.column = column


def parse_plan_map(pairs: list[str], plans: frozenset[str] | None = None) -> dict[str, str]:
    """PLAN_MAP_V1 with the `OLD=NEW` overrides applied; each NEW must be a known plan that
    a plan_override may name."""
    mapping = dict(PLAN_MAP_V1)
    plans = OVERRIDE_PLANS if plans is None else plans & OVERRIDE_PLANS
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not new.strip():
            raise ValueError(f"--plan-map takes OLD=NEW, not {pair!r}")
        new = new.strip().lower()
        if new not in plans:
            raise ValueError(f"--plan-map {pair!r}: no plan {new!r} (plans: {sorted(plans)})")
        mapping[old.strip().lower()] = new
    unknown = sorted(set(mapping.values()) - plans)
    if unknown:
        raise ValueError(f"the plan mapping names unknown plan(s): {', '.join(unknown)}")
    return mapping


class Validator:
    """Checks records against a header, a plan mapping and the time of the run."""

    def __init__(
        self,
        header: Header,
        plan_map: Mapping[str, str],
        now: datetime,
        free_plan: str = "free",
        dates: DateRules | None = None,
    ) -> None:
        # One C call picks the 19 columns in seed order; an absent column reads as "".
        self._pick = operator.itemgetter(*(header.positions.get(c, header.width) for c in COLUMNS))
        self._plan_map = dict(plan_map)
        self._now = now
        self._free = free_plan
        self._dates = dates or DateRules()
        self._zone = self._dates.zone

    def check(self, record: RawRecord) -> tuple[Staged | None, list[Issue]]:
        """The staged values of a record (None when it fails) and its issues."""
        if record.error is not None:
            code, message = record.error
            value = shown(",".join(record.fields)) if record.fields else ""
            return None, [Issue(record.record_no, record.line_no, "", value, code, message)]
        values: tuple[str, ...] = self._pick([*record.fields, ""])
        try:
            return self._convert(record, values)
        except _Bad:
            # Rare: check every field on its own, so the report names all of them.
            return None, self._errors(record, values)

    def held_user_id(self, record: RawRecord) -> str | None:
        """The user_id a failed record holds: its own when it is a UUID and the record's
        fields are where the header says (not a ragged or unreadable record). A later record
        with that id fails as `duplicate_user_id`, as if this one had been imported."""
        if record.error is not None and record.error[0] != "invalid_encoding":
            return None
        try:
            return _user_id_text(self._pick([*record.fields, ""])[0])
        except _Bad:
            return None

    def _checks(self) -> tuple[Callable[[str], object], ...]:
        return (
            _user_id,
            _email,
            _provider,
            _text_255,
            _display_name,
            self._past_date,
            self._past_date,
            self._plan,
            _credits,
            _credits,
            _required_credits,
            _daily_cap,
            self._past_date,
            self._date,
            _boolean,
            _status,
            _stripe_customer,
            _stripe_subscription,
            _billing_status,
        )

    def _errors(self, record: RawRecord, values: tuple[str, ...]) -> list[Issue]:
        issues = []
        results: dict[str, object] = {}
        for column, value, check in zip(COLUMNS, values, self._checks(), strict=True):
            try:
                results[column] = check(value)
            except _Bad as exc:
                issues.append(self._issue(record, column, value, exc))
        try:
            self._cross_checks(results)
        except _Bad as exc:
            column = exc.column or ""
            issues.append(self._issue(record, column, values[COLUMNS.index(column)], exc))
        return issues

    @staticmethod
    def _issue(
        record: RawRecord, column: str, value: str, exc: _Bad, severity: str = "error"
    ) -> Issue:
        return Issue(
            record.record_no, record.line_no, column, shown(value), exc.code, exc.message, severity
        )

    @staticmethod
    def _cross_checks(r: Mapping[str, object]) -> None:
        if r.get("auth_provider") in ("google", "apple"):
            if r.get("provider_user_id") is None:
                raise _Bad(
                    "missing_value",
                    f"a {r['auth_provider']} account needs its provider_user_id",
                    "provider_user_id",
                )
        elif "email" in r and r["email"] is None:
            # Only Google and Apple accounts go without an address (Apple gives it on the
            # first login only, seed 001): their provider id is what matches them then.
            raise _Bad(
                "missing_value",
                "email is required (only a google or apple account may go without one)",
                "email",
            )
        if r.get("stripe_subscription_id") is not None:
            if r.get("stripe_customer_id") is None:
                raise _Bad(
                    "subscription_without_customer",
                    "a subscription needs its customer id",
                    "stripe_subscription_id",
                )
            if r.get("billing_status") is None:
                raise _Bad(
                    "missing_value", "a subscription needs its billing_status", "billing_status"
                )

    def _convert(
        self, record: RawRecord, values: tuple[str, ...]
    ) -> tuple[Staged | None, list[Issue]]:
        (
            user_id,
            email,
            provider,
            subject,
            display_name,
            created_at,
            last_login_at,
            plan_tier,
            credits_total,
            credits_remaining,
            credits_balance,
            daily_credit_limit,
            credits_last_reset,
            monthly_reset_at,
            newsletter_opt_in,
            account_status,
            stripe_customer_id,
            stripe_subscription_id,
            billing_status,
        ) = values
        stamp = self._stamp
        results = {
            "email": _email(email),
            "auth_provider": _provider(provider),
            "provider_user_id": _text_255(subject),
            "stripe_customer_id": _stripe_customer(stripe_customer_id),
            "stripe_subscription_id": _stripe_subscription(stripe_subscription_id),
            "billing_status": _billing_status(billing_status),
        }
        self._cross_checks(results)
        tier = plan_tier.strip().lower()
        plan = self._plan(plan_tier)
        balance = _required_credits(credits_balance)
        remaining = _credits(credits_remaining)
        subscription = results["stripe_subscription_id"]
        staged: Staged = (
            str(record.record_no),
            str(record.line_no),
            _user_id_text(user_id),
            results["email"],
            str(results["auth_provider"]),
            None if results["auth_provider"] == "email" else _opt(results["provider_user_id"]),
            _display_name(display_name),
            stamp(created_at, True),
            stamp(last_login_at, True),
            tier,
            plan,
            plan if plan != self._free and subscription is None else None,
            _opt(_credits(credits_total)),
            _opt(remaining),
            str(balance),
            _opt(_daily_cap(daily_credit_limit)),
            stamp(credits_last_reset, True),
            stamp(monthly_reset_at, False),
            "t" if _boolean(newsletter_opt_in) else "f",
            _status(account_status),
            _opt(results["stripe_customer_id"]),
            _opt(subscription),
            _opt(results["billing_status"]),
        )
        warnings: list[Issue] = []
        if remaining is not None and remaining != balance:
            warnings.append(
                self._issue(
                    record,
                    "credits_remaining",
                    credits_remaining,
                    _Bad(
                        "credits_remaining_differs",
                        f"credits_remaining {remaining} differs from credits_balance"
                        f" {balance}; the balance is authoritative",
                    ),
                    "warning",
                )
            )
        if results["billing_status"] is not None and subscription is None:
            warnings.append(
                self._issue(
                    record,
                    "billing_status",
                    billing_status,
                    _Bad("billing_status_ignored", "billing_status without a subscription"),
                    "warning",
                )
            )
        if staged[11] is not None:
            warnings.append(
                self._issue(
                    record,
                    "plan_tier",
                    plan_tier,
                    _Bad(
                        "plan_override",
                        f"paid tier {tier} without a Stripe subscription: plan_override {plan}",
                    ),
                    "warning",
                )
            )
        return staged, warnings

    def _plan(self, value: str) -> str:
        tier = value.strip().lower()
        plan = self._plan_map.get(tier)
        if plan is None:
            if not tier:
                raise _Bad(
                    "missing_value", "plan_tier is empty and the mapping declares no default"
                )
            named = shown(tier)
            raise _Bad(
                "unknown_plan", f"unknown_plan:{named} (map it with --plan-map {named}=PLAN)"
            )
        return plan

    def _stamp(self, value: str, past: bool) -> str | None:
        """A timestamp as staged: the text itself when it is the usual zoned ISO form."""
        if _ISO_ZONED.fullmatch(value):
            try:
                when = datetime.fromisoformat(value)
            except ValueError:
                raise _Bad("invalid_date", "not a valid date") from None
            if past and when > self._now:
                raise _Bad("future_date", "a date in the future")
            return value
        return _iso(self._past_date(value) if past else self._date(value))

    def _past_date(self, value: str) -> datetime | None:
        when = self._date(value)
        if when is not None and when > self._now:
            raise _Bad("future_date", "a date in the future")
        return when

    def _date(self, value: str) -> datetime | None:
        """A date or time as the rules read it; a naive one is in the declared zone."""
        text = value.strip()
        if not text:
            return None
        rules = self._dates
        if _EPOCH.fullmatch(text):
            if not rules.epoch:
                raise _Bad(
                    "invalid_date",
                    "epoch numbers are not accepted; use ISO 8601 (or declare --epoch-seconds)",
                )
            try:
                return datetime.fromtimestamp(int(text), UTC)
            except (OverflowError, OSError, ValueError):
                raise _Bad("invalid_date", "out of range as epoch seconds") from None
        slashed = _SLASH_DATE_TIME.fullmatch(text)
        if slashed and rules.order != "iso":
            first, second, year, hour, minute, sec, frac = slashed.groups()
            day, month = (first, second) if rules.order == "dmy" else (second, first)
            try:
                when = datetime(
                    int(year),
                    int(month),
                    int(day),
                    int(hour or 0),
                    int(minute or 0),
                    int(sec or 0),
                    int((frac or "0").ljust(6, "0")),
                )
            except ValueError as exc:
                raise _Bad("invalid_date", f"not a valid {rules.order} date: {exc}") from None
        elif _SLASH_DATE.fullmatch(text.split(" ")[0]) or slashed:
            if rules.order != "iso":
                raise _Bad("invalid_date", f"not {rules.order} with a 4-digit year")
            raise _Bad(
                "ambiguous_date",
                "could be dd/mm or mm/dd; use ISO 8601 or declare --date-format",
            )
        else:
            try:
                when = datetime.fromisoformat(text)
            except ValueError:
                raise _Bad("invalid_date", "not an ISO 8601 date") from None
            if when.tzinfo is not None:
                return when
        return self._localise(when)

    def _localise(self, naive: datetime) -> datetime:
        zone = self._zone
        when = naive.replace(tzinfo=zone)
        if zone is not UTC and when.astimezone(UTC).astimezone(zone).replace(tzinfo=None) != naive:
            raise _Bad("invalid_date", f"does not exist in {self._dates.time_zone} (a DST gap)")
        return when


def _opt(value: object) -> str | None:
    return None if value is None else str(value)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _required_credits(value: str) -> int:
    amount = _credits(value)
    if amount is None:
        raise _Bad("missing_value", "credits_balance is required")
    return amount


def _daily_cap(value: str) -> int | None:
    cap = _credits(value)
    if cap == 0:
        raise _Bad("out_of_range", "a daily cap must be above 0")
    return cap


def _user_id_text(value: str) -> str:
    text = value.strip().lower()
    return text if _CANONICAL_UUID.fullmatch(text) else str(_user_id(value))


def _user_id(value: str) -> uuid.UUID:
    text = value.strip()
    if not text:
        raise _Bad("missing_value", "user_id is required")
    try:
        return uuid.UUID(text)
    except ValueError:
        raise _Bad("invalid_uuid", "user_id is not a UUID") from None


def _email(value: str) -> str | None:
    """The normalised address; None when empty (which only some records may be: see
    `Validator._cross_checks`)."""
    if not value.strip():
        return None
    try:
        return normalise_email(value)
    except InvalidEmail:
        raise _Bad("invalid_email", "not a valid e-mail address") from None


def _provider(value: str) -> str:
    text = value.strip().lower()
    if not text:
        raise _Bad("missing_value", "auth_provider is required")
    if text not in PROVIDERS:
        raise _Bad("unknown_provider", f"auth_provider must be one of {', '.join(PROVIDERS)}")
    return text


def _text_255(value: str) -> str | None:
    text = value.strip()
    if not text:
        return None
    if len(text) > 255:
        raise _Bad("too_long", "at most 255 characters")
    if _CONTROL.search(text):
        raise _Bad("control_character", "control characters are not allowed")
    return text


def _display_name(value: str) -> str | None:
    text = value.strip()
    if not text:
        return None
    if len(text) > 200:
        raise _Bad("too_long", "a display name has at most 200 characters")
    if _CONTROL.search(text):
        raise _Bad("control_character", "control characters are not allowed")
    return text


def _credits(value: str) -> int | None:
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        amount = int(text)
        if amount > MAX_CREDITS:
            raise _Bad("out_of_range", f"at most {MAX_CREDITS}")
        return amount
    if text.startswith("-") and text[1:].isascii() and text[1:].isdigit():
        raise _Bad("negative_credits", "credits cannot be negative")
    raise _Bad("non_integer", "credits must be a whole number")


def _boolean(value: str) -> bool:
    text = value.strip().lower()
    if not text or text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise _Bad("invalid_boolean", "use true or false")


def _status(value: str) -> str:
    text = value.strip().lower()
    if not text:
        return "active"
    if text not in STATUSES:
        raise _Bad("unknown_status", f"account_status must be one of {', '.join(STATUSES)}")
    return text


def _stripe_customer(value: str) -> str | None:
    text = value.strip()
    if not text:
        return None
    if not _STRIPE_CUSTOMER.fullmatch(text):
        raise _Bad("invalid_stripe_id", "a Stripe customer id looks like cus_…")
    return text


def _stripe_subscription(value: str) -> str | None:
    text = value.strip()
    if not text:
        return None
    if not _STRIPE_SUBSCRIPTION.fullmatch(text):
        raise _Bad("invalid_stripe_id", "a Stripe subscription id looks like sub_…")
    return text


def _billing_status(value: str) -> str | None:
    text = value.strip().lower()
    if not text:
        return None
    if text not in BILLING_STATUSES:
        raise _Bad(
            "unknown_billing_status",
            f"billing_status must be one of {', '.join(BILLING_STATUSES)}",
        )
    return text
