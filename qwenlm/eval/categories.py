"""Subject -> category tables of the reference's C-Eval, MMLU and CMMLU scripts (what the seed cards report).

    CEVAL_CATEGORY["college_physics"]   # "STEM"
    category_members("cmmlu")           # {"STEM": [...], ..., "China specific": [...]}

Subject order is the reference's (the order its scripts run and print).
"""

from __future__ import annotations

_CEVAL = {
    "STEM": "computer_network operating_system computer_architecture college_programming college_physics "
    "college_chemistry advanced_mathematics probability_and_statistics discrete_mathematics electrical_engineer "
    "metrology_engineer high_school_mathematics high_school_physics high_school_chemistry high_school_biology "
    "middle_school_mathematics middle_school_biology middle_school_physics middle_school_chemistry "
    "veterinary_medicine",
    "Social Science": "college_economics business_administration marxism mao_zedong_thought education_science "
    "teacher_qualification high_school_politics high_school_geography middle_school_politics "
    "middle_school_geography",
    "Humanities": "modern_chinese_history ideological_and_moral_cultivation logic law "
    "chinese_language_and_literature art_studies professional_tour_guide legal_professional high_school_chinese "
    "high_school_history middle_school_history",
    "Other": "civil_servant sports_science plant_protection basic_medicine clinical_medicine urban_and_rural_planner "
    "accountant fire_engineer environmental_impact_assessment_engineer tax_accountant physician",
}
CEVAL_CATEGORY = {subject: cat for cat, names in _CEVAL.items() for subject in names.split()}
# The reference's "Hard" average (spec 9.1).
CEVAL_HARD = (
    "advanced_mathematics discrete_mathematics probability_and_statistics college_physics college_chemistry "
    "high_school_mathematics high_school_physics high_school_chemistry"
).split()

_MMLU = {
    "stem": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
    "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
    "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
    "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "Humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
    "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy prehistory "
    "professional_law world_religions",
    "other": "business_ethics college_medicine human_aging management marketing medical_genetics miscellaneous "
    "nutrition professional_accounting professional_medicine virology global_facts clinical_knowledge",
    "social": "econometrics high_school_geography high_school_government_and_politics high_school_macroeconomics "
    "high_school_microeconomics high_school_psychology human_sexuality professional_psychology public_relations "
    "security_studies sociology us_foreign_policy",
}
MMLU_CATEGORY = {subject: cat for cat, names in _MMLU.items() for subject in names.split()}

# CMMLU: subject -> sub-categories, and category -> sub-categories (evaluate_cmmlu.py); a subject can sit
# in two categories (e.g. ancient_chinese: Social Science and China specific).
_CMMLU_SUB = {
    "agronomy": "other", "anatomy": "biology", "ancient_chinese": "linguistics,china specific", "arts": "arts",
    "astronomy": "physics", "business_ethics": "business", "chinese_civil_service_exam": "politics,china specific",
    "chinese_driving_rule": "other,china specific", "chinese_food_culture": "culture,china specific",
    "chinese_foreign_policy": "politics,china specific", "chinese_history": "history,china specific",
    "chinese_literature": "literature,china specific", "chinese_teacher_qualification": "education,china specific",
    "college_actuarial_science": "math", "college_education": "education",
    "college_engineering_hydrology": "engineering", "college_law": "law", "college_mathematics": "math",
    "college_medical_statistics": "statistics", "clinical_knowledge": "other", "college_medicine": "other",
    "computer_science": "computer science", "computer_security": "other", "conceptual_physics": "physics",
    "construction_project_management": "other,china specific", "economics": "economics", "education": "education",
    "elementary_chinese": "linguistics,china specific", "elementary_commonsense": "other,china specific",
    "elementary_information_and_technology": "other", "electrical_engineering": "engineering",
    "elementary_mathematics": "math", "ethnology": "culture,china specific", "food_science": "other",
    "genetics": "biology", "global_facts": "global", "high_school_biology": "biology",
    "high_school_chemistry": "chemistry", "high_school_geography": "geography", "high_school_mathematics": "math",
    "high_school_physics": "physics", "high_school_politics": "politics,china specific", "human_sexuality": "other",
    "international_law": "law", "journalism": "sociology", "jurisprudence": "law", "legal_and_moral_basis": "other",
    "logical": "philosophy", "machine_learning": "computer science", "management": "business",
    "marketing": "business", "marxist_theory": "philosophy", "modern_chinese": "linguistics,china specific",
    "nutrition": "other", "philosophy": "philosophy", "professional_accounting": "business",
    "professional_law": "law", "professional_medicine": "other", "professional_psychology": "psychology",
    "public_relations": "politics", "security_study": "politics", "sociology": "culture", "sports_science": "other",
    "traditional_chinese_medicine": "other,china specific", "virology": "biology", "world_history": "history",
    "world_religions": "global",
}  # fmt: skip
_CMMLU_CATEGORIES = {
    "STEM": ["physics", "chemistry", "biology", "computer science", "math", "engineering", "statistics"],
    "Humanities": ["history", "philosophy", "law", "arts", "literature", "global"],
    "Social Science": ["linguistics", "business", "politics", "culture", "economics", "geography", "psychology",
                       "education", "sociology"],
    "Other": ["other"],
    "China specific": ["china specific"],
}  # fmt: skip

SUBJECTS = {
    "ceval": list(CEVAL_CATEGORY),
    "mmlu": list(MMLU_CATEGORY),
    "cmmlu": list(_CMMLU_SUB),
}


def category_members(task: str) -> dict[str, list[str]]:
    """Category -> its subjects, in the reference's order (CMMLU lists a subject once per matching sub-category,
    as the reference builds its table)."""
    if task == "ceval":
        return {cat: names.split() for cat, names in _CEVAL.items()}
    if task == "mmlu":
        return {cat: names.split() for cat, names in _MMLU.items()}
    if task == "cmmlu":
        return {
            cat: [s for s, subs in _CMMLU_SUB.items() for sub in subs.split(",") if sub in wanted]
            for cat, wanted in _CMMLU_CATEGORIES.items()
        }
    raise ValueError(f"no category table for task {task!r}")
