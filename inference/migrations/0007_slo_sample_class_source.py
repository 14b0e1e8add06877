from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("inference", "0006_policy_cache"),
    ]

    operations = [
        migrations.AddField(
            model_name="slosample",
            name="latency_class",
            field=models.CharField(default="interactive", help_text="interactive or batch", max_length=16),
        ),
        migrations.AddField(
            model_name="slosample",
            name="source",
            field=models.CharField(
                default="generation", help_text="generation, exact_cache or semantic_cache", max_length=16
            ),
        ),
        migrations.AddField(
            model_name="slosample",
            name="fallback",
            field=models.BooleanField(default=False, help_text="a tier failed and another took over (or escalated)"),
        ),
        migrations.AddField(
            model_name="slosample",
            name="queued_ms",
            field=models.FloatField(default=0, help_text="how long it waited in the fair queue for an engine slot"),
        ),
    ]
