"""An offline demo corpus: bank support tickets or clinical notes, split over clients, with canaries.

Layout written under ``out_dir``::

    public.jsonl                 public split (teacher warm-up); its persons never appear privately
    client_{i}/train.jsonl       private training split of client i (canaries planted here)
    client_{i}/heldout.jsonl     same distribution as train, different records (membership tests)
    canaries.json                every canary and exactly where its copies are
    manifest.json                seed, counts, domain, files (no paths, no timestamps)

Each site's private records carry its export stamp by default (``SITE_STAMPS``): a per-site
signal the public warm-up cannot know and site fine-tuning learns fast. ``site_stamp=False``
writes the same records without it, so what a site's training gains is only what real text
would give (the same distribution as the public split, the site's own persons and canaries).

Randomness comes only from ``Faker("en_US").seed_instance(seed)`` and ``random.Random(seed)``,
so the same seed gives byte-identical files. Dates are drawn from fixed ranges, never
relative to today.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

from faker import Faker

from common.errors import DataError

CANARY_TEMPLATE = "the account number of {name} is {secret}"
SECRET_DIGITS = 10
CANARY_LABEL = "canary"
RECORDS_PER_PERSON = 3  # each private person files about this many tickets / has this many visits

# ---------------------------------------------------------------------------- support tickets
# A ticket is header + category body + closing. Bodies may carry their own slot choices.

SUPPORT_HEADERS = [
    "Ticket {ticket} opened {date} by {name}, account {account}.",
    "Support case {ticket}, received {date}. Customer: {name} (account {account}).",
    "{date}, ticket {ticket}: message from {name}, account number {account}, phone {phone}.",
]
SUPPORT_BODIES = {
    "billing": [
        ("I was charged a monthly maintenance fee of ${amount} although my balance stayed above the minimum "
         "all month. The same fee was refunded once before in {month}. Please reverse the charge and explain "
         "why the waiver stopped applying to my account.", {}),
        ("My statement shows an overdraft fee of ${amount} on {day}, but the deposit of ${amount2} from my "
         "employer had already posted that morning. I would like the fee removed and the posting order checked.",
         {}),
        ("Customer reports being billed twice for the annual {package} package fee of ${amount}. Both charges "
         "appear on the {month} statement with reference {reference}. Customer asks for one charge to be "
         "refunded to the checking account.", {"package": ["Premier", "Select", "Everyday Plus"]}),
    ],
    "card": [
        ("My debit card ending in {last4} was declined at {merchant} in {city} even though there is enough "
         "money in the account. I travel often and need the card working by {weekday}. Please check whether "
         "a block was placed on it.", {}),
        ("I lost my credit card ending in {last4} on {day} somewhere in {city}. Please cancel it and send a "
         "replacement to {address}. I have not noticed any charges I do not recognize yet.", {}),
        ("The contactless payment on my card ending in {last4} stopped working last week. The chip works but "
         "tapping fails at every terminal, including {merchant}. Can you send a new card or reset the "
         "contactless feature?", {}),
    ],
    "fraud": [
        ("I see {count} transactions I did not make, the largest being ${amount} at {merchant} in {city} on "
         "{day}. I still have my card ending in {last4} with me. Please block the card, open a dispute, and "
         "tell me when the money will be returned.", {"count": ["two", "three", "four", "five"]}),
        ("Someone called me pretending to be from the bank and asked for the code sent to my phone. I gave it "
         "before I realized it was a scam. Since then ${amount} was transferred to an account I do not know. "
         "Please freeze my online access immediately.", {}),
        ("I received an email about a new payee named {payee} that I never added. I did not log in on {day}. "
         "Please check for unauthorized access, remove the payee and reset my credentials.", {}),
    ],
    "loan": [
        ("I would like to know the remaining balance on my {loan} and whether I can pay it off early without a "
         "penalty. My current rate is {rate}% and I have {months} payments left. Please send me a payoff quote "
         "valid until the end of the month.", {}),
        ("My {loan} payment of ${amount} was taken twice this month. This left my checking account overdrawn "
         "and I was charged a fee as well. Please refund the duplicate payment and the fee.", {}),
        ("I applied for a {loan} of ${loan_amount} on {day} and have not heard back. The website still says the "
         "application is under review. Could you tell me which documents are missing and how long a decision "
         "usually takes?", {}),
    ],
    "online-banking": [
        ("I cannot log in to the mobile app on my {device}. After entering my password I get error {error} and "
         "the app closes. I already reinstalled it twice. Please help me get access again before my rent is due.",
         {"device": ["iPhone", "Android phone", "iPad", "Samsung tablet"]}),
        ("The transfer of ${amount} I scheduled in online banking for {day} never went out, but the app shows it "
         "as completed. The recipient says nothing arrived. Please trace the payment with reference {reference}.",
         {}),
        ("I am locked out of online banking after too many password attempts and the reset link in the email "
         "has expired. I need to pay a bill of ${amount} today. Please unlock my profile or send me a new link.",
         {}),
    ],
    "account": [
        ("I would like to close my savings account and move the balance of ${amount} to my checking account. "
         "I no longer need two accounts. Please let me know if there is a fee and when the money will be "
         "available.", {}),
        ("I moved to {address} and need to update my address and phone number on the account. The online form "
         "rejects my new zip code. Please update the details and confirm by email.", {}),
        ("I want to add my spouse {spouse} as a joint owner on my checking account. What documents do we both "
         "need to bring to the {city} branch, and can we book an appointment for next {weekday}?", {}),
    ],
}
SUPPORT_CLOSINGS = [
    "Agent {agent} replied within {hours} hours and escalated the case to the {team} team.",
    "Assigned to {agent}; status: {status}.",
    "{agent} confirmed the details by phone and will follow up by {later}.",
    "Handled by agent {agent}, who {resolution}.",
]

# ---------------------------------------------------------------------------- clinical notes

CLINICAL_HEADERS = [
    "Visit note {date}. Patient {name}, DOB {dob}, MRN {mrn}.",
    "{date} clinic visit for {name} (MRN {mrn}, born {dob}).",
    "Patient: {name}. DOB: {dob}. MRN: {mrn}. Seen on {date} at the {site} clinic.",
]
CLINICAL_BODIES = {
    "cardiology": [
        ("Presents with chest tightness on exertion for {weeks} weeks. Blood pressure {bp}, heart rate {hr}. "
         "ECG shows sinus rhythm without acute changes. Started {med1} and continued {med2}. Exercise stress "
         "test ordered.", {"med1": ["metoprolol 25 mg twice daily", "aspirin 81 mg daily"],
                           "med2": ["atorvastatin 40 mg nightly", "lisinopril 10 mg daily"]}),
        ("Follow-up for atrial fibrillation. Reports occasional palpitations, no syncope. Rate controlled on "
         "{med1}. Anticoagulated with {med2}, no bleeding reported. Last echo showed an ejection fraction of "
         "{ef}%.", {"med1": ["metoprolol 50 mg daily", "diltiazem 120 mg daily"],
                    "med2": ["apixaban 5 mg twice daily", "rivaroxaban 20 mg daily"]}),
        ("Hypertension review. Home readings average {bp}. Adherent to {med1} but reports ankle swelling, so "
         "switched to {med2}. Advised a low salt diet and daily walks. Potassium {potassium} mmol/L, creatinine "
         "normal.", {"med1": ["amlodipine 10 mg daily", "nifedipine 30 mg daily"],
                     "med2": ["losartan 50 mg daily", "lisinopril 20 mg daily"]}),
    ],
    "oncology": [
        ("Cycle {cycle} of chemotherapy for stage {stage} breast cancer. Tolerating {med1} with mild nausea, "
         "managed with {med2}. Absolute neutrophil count {anc}. Next cycle in three weeks if counts recover.",
         {"med1": ["paclitaxel 80 mg/m2 weekly", "docetaxel 75 mg/m2"],
          "med2": ["ondansetron 8 mg as needed", "prochlorperazine 10 mg as needed"]}),
        ("Surveillance visit after resection of colon adenocarcinoma. No weight loss or abdominal pain. CEA "
         "{cea} ng/mL, stable since the last visit. CT of chest, abdomen and pelvis ordered. Continues {med1} "
         "for neuropathy.", {"med1": ["gabapentin 300 mg three times daily", "duloxetine 30 mg daily"]}),
        ("New diagnosis of non-small cell lung cancer discussed with the patient and family. Biopsy confirmed "
         "adenocarcinoma, molecular testing pending. Pain controlled with {med1}. Referred to radiation "
         "oncology and social work.", {"med1": ["oxycodone 5 mg every 6 hours as needed",
                                                "morphine ER 15 mg twice daily"]}),
    ],
    "endocrinology": [
        ("Type 2 diabetes follow-up. HbA1c {a1c}%, down from {a1c_before}% in {month}. Taking {med1} and "
         "{med2}. No hypoglycemia reported. Foot exam normal. Referred for the annual eye exam.",
         {"med1": ["metformin 1000 mg twice daily", "metformin 500 mg twice daily"],
          "med2": ["empagliflozin 10 mg daily", "semaglutide 0.5 mg weekly"]}),
        ("Hypothyroidism review. Reports fatigue and weight gain since {month}. TSH {tsh} mIU/L. Increased "
         "{med1}. Repeat thyroid labs in six weeks and call with the results.",
         {"med1": ["levothyroxine to 100 mcg daily", "levothyroxine to 112 mcg daily"]}),
        ("Type 1 diabetes on an insulin pump. Two episodes of low glucose overnight last week, so the basal "
         "rate was reduced. Continues {med1} at meals. Glucose sensor data reviewed with the patient.",
         {"med1": ["insulin lispro 1 unit per 10 g carbohydrate", "insulin aspart 1 unit per 12 g carbohydrate"]}),
    ],
    "orthopedics": [
        ("Right knee pain after a fall {weeks} weeks ago. Swelling and limited flexion. X-ray without fracture; "
         "MRI ordered to assess the meniscus. {med1} for pain and physical therapy twice weekly.",
         {"med1": ["Ibuprofen 600 mg three times daily", "Naproxen 500 mg twice daily"]}),
        ("Six weeks after total hip replacement. Walking with a cane, wound healed, range of motion improving. "
         "Stop {med1}. Continue {med2} as needed. Return to driving discussed.",
         {"med1": ["enoxaparin 40 mg daily", "aspirin 81 mg twice daily"],
          "med2": ["acetaminophen 1 g every 8 hours", "tramadol 50 mg"]}),
        ("Low back pain radiating to the left leg. Straight leg raise positive, no bowel or bladder symptoms. "
         "Started {med1} and {med2}. Referred to physiotherapy; MRI if no improvement in six weeks.",
         {"med1": ["naproxen 500 mg twice daily", "meloxicam 15 mg daily"],
          "med2": ["cyclobenzaprine 5 mg at night", "methocarbamol 750 mg"]}),
    ],
    "neurology": [
        ("Migraine follow-up. {headache_days} headache days per month, down from {headache_before}. Preventive "
         "{med1} tolerated without side effects. Uses {med2} for acute attacks. Headache diary reviewed.",
         {"med1": ["topiramate 50 mg twice daily", "propranolol 40 mg twice daily"],
          "med2": ["sumatriptan 50 mg", "rizatriptan 10 mg"]}),
        ("Seizure review. Last seizure {weeks} weeks ago. Level of {med1} therapeutic. Counseled on driving "
         "restrictions and sleep hygiene. EEG to be repeated before the next visit.",
         {"med1": ["levetiracetam 500 mg twice daily", "lamotrigine 100 mg twice daily"]}),
        ("New tremor of both hands, worse with action and better after alcohol. No rigidity or slowness. Family "
         "history positive. Thyroid function normal. Started {med1}.",
         {"med1": ["propranolol 20 mg twice daily", "primidone 25 mg at night"]}),
    ],
    "pediatrics": [
        ("Well child visit. Weight {weight} kg, height {height} cm, growth along the {percentile}th percentile. "
         "Vaccines given today per schedule. Parents report good appetite and sleep. No concerns raised.", {}),
        ("Fever for {days} days with ear pain. Temperature {temp} C. Left tympanic membrane bulging, diagnosed "
         "otitis media. Prescribed {med1}. Return if the fever persists beyond 48 hours.",
         {"med1": ["amoxicillin 45 mg/kg/day in two doses", "amoxicillin-clavulanate 90 mg/kg/day"]}),
        ("Asthma follow-up. Night cough twice a week. Uses {med1} as a rescue inhaler. Started {med2} daily. "
         "Inhaler technique with spacer reviewed with the parent.",
         {"med1": ["albuterol 2 puffs", "albuterol 4 puffs"],
          "med2": ["fluticasone 44 mcg 2 puffs twice", "budesonide 180 mcg twice"]}),
    ],
}
CLINICAL_CLOSINGS = [
    "Follow-up in {weeks2} weeks with Dr. {agent}.",
    "Signed by Dr. {agent}, {site} clinic.",
    "Plan discussed with the patient; next visit on {later} with Dr. {agent}.",
]

# Each site exports records in its own house format (its CRM / EHR system stamps a line in
# front of every record). Public data has no such stamp. This is the site-specific signal a
# site's DP fine-tuning can learn and a public warm-up cannot.
SITE_STAMPS = {
    "support": "[{site} branch | internal CRM export | queue {queue}]",
    "clinical": "[{site} Medical Center | EHR progress note | unit {queue}]",
}

DOMAINS = {
    "support": (SUPPORT_HEADERS, SUPPORT_BODIES, SUPPORT_CLOSINGS),
    "clinical": (CLINICAL_HEADERS, CLINICAL_BODIES, CLINICAL_CLOSINGS),
}


def generate_corpus(
    out_dir,
    n_clients: int = 5,
    seed: int = 0,
    train_per_client: int = 200,
    heldout_per_client: int = 50,
    public_records: int = 1000,
    canaries_per_repeat: int = 2,
    repeats=(1, 4, 16),
    domain: str = "support",
    site_stamp: bool = True,
) -> dict:
    """Write the corpus under ``out_dir`` and return its manifest (also written as manifest.json)."""
    repeats = tuple(repeats)
    _check_args(n_clients, train_per_client, heldout_per_client, public_records, canaries_per_repeat, repeats, domain)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a directory; pass --out a new or existing directory")

    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = random.Random(seed)
    names = _unique_names(fake)  # one stream: agents, public, private and canary persons never coincide
    agents = [next(names) for _ in range(12)]
    public_persons = _persons(names, rng, _pool_size(public_records), domain)
    client_persons = [_persons(names, rng, _pool_size(train_per_client + heldout_per_client), domain)
                      for _ in range(n_clients)]

    sites = [fake.city() for _ in range(n_clients)]

    def records(persons, n, site=None):
        site = site if site_stamp else None
        return [_record(domain, rng.choice(persons), agents, fake, rng, site) for _ in range(n)]

    public = records(public_persons, public_records)
    trains = [records(p, train_per_client, site) for p, site in zip(client_persons, sites)]
    heldouts = [records(p, heldout_per_client, site) for p, site in zip(client_persons, sites)]

    used_accounts = {p["account"] for pool in [public_persons, *client_persons] for p in pool}
    canaries = _draw_canaries(names, rng, repeats, canaries_per_repeat, n_clients, used_accounts)
    for client, train in enumerate(trains):
        trains[client] = _plant(train, [c for c in canaries if c["client"] == client], rng)

    files = {"public.jsonl": public}
    for client in range(n_clients):
        files[f"client_{client}/train.jsonl"] = trains[client]
        files[f"client_{client}/heldout.jsonl"] = heldouts[client]
    for name, rows in files.items():
        _write(out_dir / name, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))
    canary_doc = {"template": CANARY_TEMPLATE, "secret_digits": SECRET_DIGITS, "canaries": canaries}
    _write(out_dir / "canaries.json", _dump(canary_doc))

    manifest = {
        "generator": "privdistill.common.data.generate",
        "seed": seed,
        "domain": domain,
        "site_stamp": site_stamp,
        "categories": list(DOMAINS[domain][1]),
        "n_clients": n_clients,
        "counts": {
            "public": public_records,
            "train_per_client": train_per_client,
            "heldout_per_client": heldout_per_client,
            "canaries_planted": sum(c["client"] is not None for c in canaries),
            "canaries_heldout": sum(c["client"] is None for c in canaries),
            "canary_copies": sum(c["repeats"] for c in canaries),
            "public_persons": len(public_persons),
            "private_persons": sum(map(len, client_persons)),
        },
        "repeats": list(repeats),
        "files": {
            "public": "public.jsonl",
            "clients": [{"train": f"client_{i}/train.jsonl", "heldout": f"client_{i}/heldout.jsonl",
                         "train_records": len(trains[i]), "heldout_records": len(heldouts[i])}
                        for i in range(n_clients)],
            "canaries": "canaries.json",
        },
    }
    _write(out_dir / "manifest.json", _dump(manifest))
    return manifest


def _check_args(n_clients, train, heldout, public, canaries_per_repeat, repeats, domain) -> None:
    if domain not in DOMAINS:
        raise DataError(f"unknown domain {domain!r}; use one of {', '.join(DOMAINS)}")
    if n_clients < 1:
        raise DataError(f"number of clients must be at least 1, got {n_clients}")
    counts = {"train records per client": train, "heldout records per client": heldout,
              "public records": public, "canaries per repeat": canaries_per_repeat}
    for what, value in counts.items():
        if value < 1:
            raise DataError(f"{what} must be at least 1, got {value}")
    if not repeats or any(not isinstance(r, int) or r < 1 for r in repeats):
        raise DataError(f"canary repeats must be integers >= 1, got {list(repeats)}")


def _pool_size(n_records: int) -> int:
    return max(1, n_records // RECORDS_PER_PERSON)


def _unique_names(fake: Faker):
    seen = set()
    while True:
        name = f"{fake.first_name()} {fake.last_name()}"
        if name not in seen:
            seen.add(name)
            yield name


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def _date(rng: random.Random, start: dt.date, days: int) -> dt.date:
    return start + dt.timedelta(days=rng.randrange(days))


def _persons(names, rng, n, domain) -> list[dict]:
    """A person keeps the same account number / MRN, phone and birth date across their records."""
    persons = []
    for _ in range(n):
        child = domain == "clinical" and rng.random() < 1 / 6  # pediatrics patients need a child's DOB
        born = _date(rng, dt.date(2009, 1, 1) if child else dt.date(1935, 1, 1), 5000 if child else 24000)
        persons.append({
            "name": next(names),
            "account": _digits(rng, 10),
            "mrn": _digits(rng, 8),
            "phone": f"({rng.randrange(201, 990)}) {rng.randrange(200, 999)}-{_digits(rng, 4)}",
            "dob": born.isoformat(),
            "child": child,
        })
    return persons


def _record(domain: str, person: dict, agents: list[str], fake: Faker, rng: random.Random,
            site: str | None = None) -> dict:
    headers, bodies, closings = DOMAINS[domain]
    if domain == "clinical":  # children are seen in pediatrics and only there
        category = "pediatrics" if person["child"] else rng.choice([c for c in bodies if c != "pediatrics"])
    else:
        category = rng.choice(list(bodies))
    body, own_slots = rng.choice(bodies[category])
    day = _date(rng, dt.date(2023, 1, 1), 730)
    later = day + dt.timedelta(days=rng.randrange(3, 60))
    slots = {
        "name": person["name"], "account": person["account"], "phone": person["phone"],
        "mrn": person["mrn"], "dob": person["dob"], "date": day.isoformat(),
        "day": f"{day:%B} {day.day}", "month": f"{day - dt.timedelta(days=rng.randrange(30, 200)):%B}",
        "later": f"{later:%B} {later.day}",
        "weekday": rng.choice(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]),
        "agent": rng.choice(agents), "city": fake.city(), "merchant": fake.company(),
        "address": f"{fake.street_address()}, {fake.city()}", "payee": f"{fake.first_name()} {fake.last_name()}",
        "spouse": f"{fake.first_name()} {person['name'].split()[-1]}",
        "ticket": f"SR-{rng.randrange(10**6, 10**7)}", "reference": f"TRX{_digits(rng, 9)}",
        "amount": f"{rng.randrange(5, 2500)}.{_digits(rng, 2)}", "amount2": f"{rng.randrange(300, 6000)}.{_digits(rng, 2)}",
        "loan_amount": f"{rng.randrange(5, 400) * 1000:,}", "rate": f"{rng.uniform(2.5, 11.9):.2f}",
        "months": rng.randrange(3, 300), "last4": _digits(rng, 4), "error": f"E{rng.randrange(100, 999)}",
        "loan": rng.choice(["car loan", "mortgage", "personal loan", "student loan", "home equity loan"]),
        "hours": rng.choice([2, 4, 12, 24, 48]),
        "team": rng.choice(["disputes", "card services", "lending", "digital banking", "fraud prevention"]),
        "status": rng.choice(["waiting for customer", "resolved", "escalated", "pending review"]),
        "resolution": rng.choice(["refunded the fee", "unlocked the profile", "ordered a replacement card",
                                  "opened a formal dispute", "sent the requested documents by email"]),
        "site": rng.choice(["downtown", "north", "riverside", "university", "west"]),
        "weeks": rng.randrange(2, 12), "weeks2": rng.choice([2, 4, 6, 8, 12]),
        "bp": f"{rng.randrange(110, 175)}/{rng.randrange(65, 105)}", "hr": rng.randrange(52, 110),
        "ef": rng.randrange(35, 65), "potassium": f"{rng.uniform(3.4, 5.2):.1f}",
        "cycle": rng.randrange(1, 7), "stage": rng.choice(["I", "II", "III"]), "anc": rng.randrange(900, 4500),
        "cea": f"{rng.uniform(0.5, 4.5):.1f}", "a1c": f"{rng.uniform(6.1, 7.9):.1f}",
        "a1c_before": f"{rng.uniform(8.0, 10.5):.1f}", "tsh": f"{rng.uniform(4.6, 12.0):.1f}",
        "headache_days": rng.randrange(2, 6), "headache_before": rng.randrange(8, 15),
        "weight": f"{rng.uniform(9, 55):.1f}", "height": rng.randrange(75, 165), "percentile": rng.choice([10, 25, 50, 75, 90]),
        "days": rng.randrange(2, 5), "temp": f"{rng.uniform(38.1, 39.8):.1f}",
    }
    for slot, choices in own_slots.items():
        slots[slot] = rng.choice(choices)
    parts = (rng.choice(headers), body, rng.choice(closings))
    text = " ".join(part.format(**slots) for part in parts)
    if site is not None:
        text = SITE_STAMPS[domain].format(site=site, queue=rng.randrange(1, 9)) + " " + text
    return {"text": text, "label": category, "person": person["name"]}


def _draw_canaries(names, rng, repeats, per_repeat, n_clients, used_accounts) -> list[dict]:
    """Planted canaries (round-robin over clients), then as many held-out ones (written nowhere else)."""
    specs = [(r, i % n_clients) for i, r in enumerate(r for r in repeats for _ in range(per_repeat))]
    specs += [(0, None)] * len(specs)
    canaries, secrets = [], set(used_accounts)
    for number, (repeat, client) in enumerate(specs):
        name, secret = next(names), _digits(rng, SECRET_DIGITS)
        while secret in secrets:  # no secret doubles as another canary's or a person's account number
            secret = _digits(rng, SECRET_DIGITS)
        secrets.add(secret)
        canaries.append({
            "id": f"canary-{number:03d}", "name": name, "secret": secret,
            "text": CANARY_TEMPLATE.format(name=name, secret=secret), "repeats": repeat, "client": client,
            "file": None if client is None else f"client_{client}/train.jsonl", "lines": [],
        })
    return canaries


def _plant(train: list[dict], canaries: list[dict], rng: random.Random) -> list[dict]:
    """Insert ``repeats`` copies of each canary at random lines; record those lines on the canary."""
    copies = [c for c in canaries for _ in range(c["repeats"])]
    total = len(train) + len(copies)
    positions = sorted(rng.sample(range(total), len(copies)))
    rng.shuffle(copies)
    at = dict(zip(positions, copies))
    base = iter(train)
    rows = []
    for line in range(total):
        canary = at.get(line)
        if canary is None:
            rows.append(next(base))
        else:
            canary["lines"].append(line)  # ascending, since lines are visited in order
            rows.append({"text": canary["text"], "label": CANARY_LABEL, "person": canary["name"]})
    return rows


def _dump(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, indent=2) + "\n"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="\n")


def plant_canaries(data_path, out_dir, repeats=(1, 4, 16), canaries_per_repeat: int = 2, seed: int = 0,
                   fmt: str | None = None, field: str = "text") -> dict:
    """Copy a user's own private file to ``out_dir/train.jsonl`` with canaries planted in it.

    Same template and bookkeeping as the demo corpus: ``out_dir/canaries.json`` says which
    canary is on which lines (and lists as many never-planted ones) for a later audit. Train
    on the copy, keep canaries.json away from anything that is sent.
    """
    from common.data.loading import load_records

    repeats = tuple(repeats)
    if canaries_per_repeat < 1 or not repeats or any(r < 1 for r in repeats):
        raise DataError("plant at least one canary per repeat count, with repeat counts ≥ 1 (e.g. 1,4,16)")
    records = load_records(data_path, fmt=fmt, field=field)
    out_dir = Path(out_dir)
    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = random.Random(seed)
    corpus_text = "\n".join(r.text for r in records)
    names = (n for n in _unique_names(fake) if n not in corpus_text)  # canary people appear nowhere else
    canaries = _draw_canaries(names, rng, repeats, canaries_per_repeat, 1, set())
    rows = [{"text": r.text, "label": r.label} for r in records]
    rows = _plant(rows, [c for c in canaries if c["client"] == 0], rng)
    for canary in canaries:
        if canary["client"] is not None:
            canary["file"] = "train.jsonl"
    _write(out_dir / "train.jsonl", "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))
    doc = {"template": CANARY_TEMPLATE, "secret_digits": SECRET_DIGITS, "source": str(data_path), "canaries": canaries}
    _write(out_dir / "canaries.json", _dump(doc))
    return doc
